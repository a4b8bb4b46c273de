"""Compressed-domain attention (velox.kernels) against the decode-everything path."""

import importlib

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

import velox
from velox import kernels
from velox.kernels import cpu, metal, reference
from velox.methods import get_method, ratequant, scalar, turboquant_mse
from velox.methods.base import LayerSpec
from velox.methods.scalar import PackLayout, ScalarCodec, pack, unpack
from velox.runtime import attention
from velox.runtime.cache import VeloxKVCache

HQ, HKV, D = 9, 3, 64


def make_cache(bits=4, sink=0, window=0, fast=True, mean=False):
    kc, vc = turboquant_mse.make_codec(HKV, D, bits, 0), turboquant_mse.make_codec(HKV, D, bits, 1)
    if mean:  # calibrated codecs (spectral) carry a per-head mean and per-coordinate scales
        for i, c in enumerate((kc, vc)):
            c.mean = 0.3 * mx.random.normal((HKV, D), key=mx.random.key(5 + i))
            c.scale = c.scale * mx.random.uniform(0.5, 1.5, (HKV, D), key=mx.random.key(7 + i))
    return VeloxKVCache(kc, vc, method="turboquant_mse", sink=sink, window=window, fast=fast)


def rand(shape, seed):
    return mx.random.normal(shape, key=mx.random.key(seed))


# MLX's GPU backends run float32 matmuls at reduced (TF32-like) precision.
TOL = 2e-5 if mx.default_device() == mx.cpu else 5e-3


def close(a, b, tol=TOL):
    err = mx.max(mx.abs(a - b)).item() / max(mx.max(mx.abs(b)).item(), 1e-6)
    assert err < tol, err


def check_against_decode_everything(cache: VeloxKVCache) -> None:
    """Prefill in chunks (causal string and array masks), then decode steps, with and without
    attention sinks: ``cache`` (fast, codes only) against SDPA over the decoded history."""
    plain = VeloxKVCache(cache.key_codec, cache.value_codec, sink=cache.sink, window=cache.window)  # decodes
    sinks = rand((HQ,), 9)
    steps = [(0, 37, "causal"), (37, 100, "array"), (100, 101, None), (101, 102, None), (102, 170, "causal")]
    for i, (a, b, mask_kind) in enumerate(steps):
        L = b - a
        q, k, v = rand((1, HQ, L, D), 3 * i), rand((1, HKV, L, D), 3 * i + 1), rand((1, HKV, L, D), 3 * i + 2)
        mask = cache.make_mask(L, return_array=True, window_size=None) if mask_kind == "array" else mask_kind
        returned = cache.update_and_fetch(k, v)
        assert cache.codes_only and returned[0] is k  # nothing decoded
        ks, vs = plain.update_and_fetch(k, v)
        for s in (None, sinks):
            ref = mx.fast.scaled_dot_product_attention(q, ks, vs, scale=D**-0.5, mask=mask, sinks=s)
            got = cache.attend(q, k, v, scale=D**-0.5, mask=mask, sinks=s)
            close(got, ref)
            # small blocks: the online softmax across many blocks of one segment
            close(reference.attend(q, cache.compressed(), D**-0.5, mask, s, block=16), ref)
    assert mx.array_equal(cache.fetch()[0], ks)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("sink,window", [(0, 0), (4, 0), (0, 16), (3, 8)])
def test_reference_matches_decode_everything(bits, sink, window, dispatcher):
    check_against_decode_everything(make_cache(bits, sink, window, mean=sink > 0))


def uniform(method: str, key_bits: int, value_bits: int):
    """A data-free method's (key codec, value codec) maker for HKV heads."""
    return lambda: get_method(method).make_codecs({}, LayerSpec(0, HKV, D, key_bits, value_bits))


def mixed(method: str, key_bits: list[int], value_bits: list[int]):
    """RateQuant's per-head widths: HeadGroupCodecs (groups not in head order)."""
    spec = LayerSpec(0, HKV, D, 0, 0)
    return lambda: ratequant.make_mixed_codecs(get_method(method), {}, spec, key_bits, value_bits)


# Codec pairs of the data-free post-RoPE methods (widths chosen to cover the lookup tables and
# the general unpack) and RateQuant's mixed widths over each.
CODECS = {
    "rvq 4/4": uniform("turboquant_rvq", 4, 4),
    "rvq 5/3": uniform("turboquant_rvq", 5, 3),
    "prod 4/4": uniform("turboquant_prod", 4, 4),
    "prod 2/3": uniform("turboquant_prod", 2, 3),
    "qjl 2/4": uniform("qjl", 2, 4),
    "qjl 1/3": uniform("qjl", 1, 3),
    "ratequant mse": mixed("turboquant_mse", [2, 4, 3], [3, 4, 2]),
    "ratequant rvq": mixed("turboquant_rvq", [5, 2, 5], [3, 3, 4]),
    "ratequant prod": mixed("turboquant_prod", [3, 4, 3], [4, 2, 4]),
    "ratequant qjl": mixed("qjl", [1, 2, 1], [4, 4, 3]),
}


@pytest.mark.parametrize("codecs", CODECS)
@pytest.mark.parametrize("sink,window", [(0, 0), (3, 8)])
def test_data_free_methods_match_decode_everything(codecs, sink, window, dispatcher):
    key_codec, value_codec = CODECS[codecs]()
    assert kernels.supports(key_codec, value_codec)
    check_against_decode_everything(VeloxKVCache(key_codec, value_codec, sink=sink, window=window, fast=True))


def test_bool_and_additive_head_masks_and_batch(dispatcher):
    """Per-query-head masks [B, Hq, L, S] (grouped per KV head) and batch 2."""
    cache = make_cache(sink=2, window=4)
    k, v = rand((2, HKV, 50, D), 1), rand((2, HKV, 50, D), 2)
    cache.update_and_fetch(k, v)
    ks, vs = cache.fetch()
    q = rand((2, HQ, 5, D), 3)
    keep = rand((2, HQ, 5, 50), 4) > -0.5
    for mask in (keep, mx.where(keep, 0.0, -1e9) + 0.1 * rand((2, HQ, 5, 50), 5)):
        ref = mx.fast.scaled_dot_product_attention(q, ks, vs, scale=0.1, mask=mask)
        close(kernels.attend(q, cache.compressed(), scale=0.1, mask=mask), ref)


def test_fully_masked_rows_give_zeros_not_nan():
    cache = make_cache()
    cache.update_and_fetch(rand((1, HKV, 8, D), 1), rand((1, HKV, 8, D), 2))
    out = kernels.attend(rand((1, HQ, 2, D), 3), cache.compressed(), scale=0.1,
                         mask=mx.zeros((2, 8), dtype=mx.bool_))
    assert not mx.any(mx.isnan(out)).item() and mx.max(mx.abs(out)).item() == 0


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_unpack_and_tables_equal_the_codes(bits):
    codec = turboquant_mse.make_codec(HKV, D, bits, 0)
    codes = mx.random.randint(0, 1 << bits, (1, HKV, 7, D), key=mx.random.key(0)).astype(mx.uint32)
    words = pack(codes, codec.layout)
    assert mx.array_equal(unpack(words, codec.layout), codes)
    assert (scalar.shared_table(codec) is not None) == (bits in (1, 2, 4, 8))
    expect = mx.take(codec.flat_levels, codec.flat_base + codes)
    assert mx.array_equal(scalar.code_levels(words, codec), expect)
    assert mx.array_equal(scalar.code_levels(words[:, :, 2:5], codec), expect[:, :, 2:5])  # views of slices


def test_sign_table_equals_general_unpack():
    for n in (64, 100, 256):  # 100: the last word holds padding bits
        words = mx.random.randint(0, 1 << 16, (2, HKV, 7, 2 * -(-n // 32)), key=mx.random.key(n)).astype(mx.uint16)
        words = words.view(mx.uint32)  # every bit random
        expect = unpack(words, scalar.sign_layout(n)).astype(mx.float32) * 2.0 - 1.0
        assert mx.array_equal(scalar.unpack_signs(words, n), expect)
        assert mx.array_equal(scalar.unpack_signs(words[:, :, 2:5], n), expect[:, :, 2:5])


def test_mixed_widths_use_the_general_unpack():
    bits = np.tile(np.array([4, 3] * (D // 2)), (HKV, 1))
    codec = turboquant_mse.make_codec(HKV, D, 4, 0)
    codec = ScalarCodec(rotation=codec.rotation, scale=codec.scale, levels=codec.levels, bits=bits)
    assert scalar.uniform_bits(codec) == 0 and scalar.shared_table(codec) is None
    codes = mx.array((np.random.default_rng(0).integers(0, 16, (1, HKV, 5, D)) % (1 << bits)[None, :, None]).astype(np.uint32))
    assert mx.array_equal(unpack(pack(codes, PackLayout.from_bits(bits)), codec.layout), codes)


def test_without_dispatcher_or_support_the_history_is_decoded(dispatcher):
    attention.uninstall()  # e.g. capture() removed it: mlx_lm's sdpa must get the whole history
    cache = make_cache(fast=True)
    ks, _ = cache.update_and_fetch(rand((1, HKV, 10, D), 1), rand((1, HKV, 10, D), 2))
    assert ks.shape[2] == 10 and not cache.codes_only
    attention.install()
    ks, _ = cache.update_and_fetch(rand((1, HKV, 1, D), 3), rand((1, HKV, 1, D), 4))
    assert ks.shape[2] == 1 and cache.codes_only

    class Other:  # a codec the fast path does not know
        def __init__(self, inner):
            self.inner = inner

        def encode(self, x, offset=0):
            return self.inner.encode(x, offset)

        def decode(self, *parts, offset=0):
            return self.inner.decode(*parts, offset=offset)

    other = VeloxKVCache(Other(cache.key_codec), cache.value_codec, fast=True)
    assert not other.fast
    # a head group is supported only when every group's codec is
    grouped = ratequant.HeadGroupCodec([([0, 2], turboquant_mse.make_codec(2, D, 4, 0)),
                                        ([1], Other(turboquant_mse.make_codec(1, D, 4, 0)))], D)
    assert not kernels.supports(grouped, cache.value_codec)
    assert not kernels.supports(cache.key_codec, Other(cache.value_codec))
    assert other.update_and_fetch(rand((1, HKV, 3, D), 1), rand((1, HKV, 3, D), 2))[0].shape[2] == 3
    assert kernels.backend() in ("cpu", "metal", "cuda")


@pytest.fixture(scope="module")
def converted(tiny_llama, tmp_path_factory) -> dict:
    """Tiny llama folders: every data-free post-RoPE method (fp16 sink 2 and window 8), and
    RateQuant's per-head widths over turboquant_prod (HeadGroupCodec keys and values)."""
    from velox.convert.cli import main as convert_main

    root = tmp_path_factory.mktemp("fast")
    calib = ["--hf-path", str(tiny_llama), "--calib-tokens", "128", "--calib-seq-len", "64", "--quiet"]
    assert convert_main([*calib, "--mlx-path", str(root / "uniform"), "--kv-sink", "2", "--kv-window", "8",
                         "--kv", "turboquant_mse,turboquant_rvq,turboquant_prod,qjl"]) == 0
    assert convert_main([*calib, "--mlx-path", str(root / "ratequant"), "--kv", "turboquant_prod",
                         "--kv-bits", "2.5"]) == 0
    # pre-RoPE keys whose basis commutes with RoPE, with an fp16 sink (coded positions start at 2)
    assert convert_main([*calib, "--mlx-path", str(root / "pairs"), "--kv", "spectral", "--spectral-basis", "pairs",
                         "--kv-sink", "2"]) == 0
    return {"uniform": root / "uniform", "ratequant": root / "ratequant", "pairs": root / "pairs"}


@pytest.mark.parametrize("folder,method", [("uniform", "turboquant_mse"), ("uniform", "turboquant_rvq"),
                                           ("uniform", "turboquant_prod"), ("uniform", "qjl"),
                                           ("ratequant", "turboquant_prod"), ("pairs", "spectral")])
def test_tiny_llama_generates_the_same_tokens_fast_or_not(converted, folder, method):
    prompt = mx.array([[1, 504, 2281, 314, 260, 1345, 282, 4649, 47, 378, 3086, 314]])
    runs = {}
    for fast in (True, False):
        model, _ = velox.load(str(converted[folder]), kv=method, fast=fast)
        assert attention.is_installed()
        cache = mlx_lm.models.cache.make_prompt_cache(model)
        assert all(isinstance(c, VeloxKVCache) and c.fast == fast for c in cache)
        assert isinstance(cache[0].key_codec, ratequant.HeadGroupCodec) == (folder == "ratequant")
        # prefill in two chunks (the second with an offset), then greedy decode
        logits = model(prompt[:, :5], cache=cache)
        logits = model(prompt[:, 5:], cache=cache)
        first = logits
        tokens = []
        for _ in range(24):
            tok = mx.argmax(logits[:, -1], axis=-1)
            tokens.append(tok.item())
            logits = model(tok[:, None], cache=cache)
        assert cache[0].coded > 0 and cache[0].codes_only == fast
        runs[fast] = (tokens, first)
    assert runs[True][0] == runs[False][0]
    close(runs[True][1], runs[False][1], tol=1e-4)


def per_coordinate_codec(codec: ScalarCodec, seed: int, dense_rotation: bool) -> ScalarCodec:
    """A calibrated-like codec: per-coordinate scales, a mean, and a codebook per coordinate (the
    kernel's general table instead of the lane-replicated shared one); dense_rotation: a random
    orthogonal rotation per head (the kernel's matrix path, not its Walsh-Hadamard one)."""
    H, D, _ = codec.levels.shape
    stretch = mx.random.uniform(0.5, 1.5, (H, D, 1), key=mx.random.key(seed))
    rotation = codec.rotation
    if dense_rotation:
        rotation = mx.array(np.stack([np.linalg.qr(np.random.default_rng(seed + h).standard_normal((D, D)))[0]
                                      for h in range(H)]).astype(np.float32))
    return ScalarCodec(rotation=rotation, levels=codec.levels * stretch, bits=codec.bits,
                       scale=codec.scale * mx.random.uniform(0.5, 1.5, (H, D), key=mx.random.key(seed + 1)),
                       mean=0.3 * rand((H, D), seed + 2))


KERNEL_CASES = [(hq, hkv, d, n, case, 4, 4) for hq, hkv, d in [(9, 3, 64), (32, 8, 128), (8, 8, 128), (64, 8, 128)]
                for n in [1, 70, 1000, 20000] for case in ["plain", "calibrated", "fp16_regions"]]
# 2-bit keys (and values): the widths the kernel reads besides 4
KERNEL_CASES += [(hq, hkv, d, n, case, kb, vb) for hq, hkv, d in [(9, 3, 64), (32, 8, 128)] for n in [70, 20000]
                 for case in ["plain", "calibrated"] for kb, vb in [(2, 4), (2, 2)]]
# the decode launch encoding the step's new token (GPU kernels only)
KERNEL_CASES += [(hq, hkv, d, n, case, kb, vb) for hq, hkv, d in [(9, 3, 64), (32, 8, 128)] for n in [1, 70, 20000]
                 for case in ["new", "calibrated_new"] for kb, vb in [(4, 4), (2, 4)]]


@pytest.mark.parametrize("backend", [
    pytest.param("cpu", marks=pytest.mark.skipif(kernels.backend() != "cpu" or cpu.library() is None,
                                                  reason="needs MLX's CPU backend and a C compiler")),
    pytest.param("cuda", marks=pytest.mark.skipif(kernels.backend() != "cuda", reason="needs MLX's CUDA backend")),
    pytest.param("metal", marks=pytest.mark.skipif(not (mx.metal.is_available() and metal._METAL_3_2),
                                                    reason="needs Apple silicon, macOS 15 (Metal 3.2)")),
])
@pytest.mark.parametrize("hq,hkv,d,n,case,key_bits,value_bits", KERNEL_CASES)
def test_kernel_matches_reference(backend, hq, hkv, d, n, case, key_bits, value_bits):
    """Decode over n coded tokens with the backend's kernel (cpu: the C partial inside the
    reference). plain: codes only (decode, shared
    codebook); calibrated: + per-coordinate codebooks, means, attention sinks, batch 2, float16
    queries; fp16_regions: + fp16 sink/window tokens (coded_partial merged by the reference);
    *new: the launch also encodes the last token (CompressedKV.new) into its emptied slot, which
    must then hold the encoder's codes."""
    if backend == "cpu" and n > 1000:
        pytest.skip("the CPU kernel's tiles are the same at any length; 20000 tokens only cost CI time")
    new = case.endswith("new")
    if new and backend == "cpu":
        pytest.skip("the CPU path takes no new token (the cache encodes it with mx ops)")
    fused = importlib.import_module(f"velox.kernels.{backend}")
    kc, vc = turboquant_mse.make_codec(hkv, d, key_bits, 0), turboquant_mse.make_codec(hkv, d, value_bits, 1)
    B, sink, window, dtype = 1, 0, 0, mx.float32
    if case not in ("plain", "new"):
        # fp16_regions: the kernel gets queries already rotated (by mx glue), so its rotation
        # paths are not involved; dense rotations there only add TF32 error to the glue
        dense = case != "fp16_regions"
        kc, vc = per_coordinate_codec(kc, 5, dense), per_coordinate_codec(vc, 8, dense)
        B, dtype = 2, mx.float16
    if case == "fp16_regions":
        sink, window = 2, 3
    cache = VeloxKVCache(kc, vc, sink=sink, window=window, fast=True)
    total = n + sink + window
    cache.update_and_fetch(rand((B, hkv, total, d), 1), rand((B, hkv, total, d), 2))
    kv = cache.compressed()
    assert kv.n_coded == n
    q = rand((B, hq, 1, d), 3).astype(dtype)
    sinks = rand((hq,), 4) if case not in ("plain", "new") else None
    assert fused.supports(q, kv, None)
    if new:  # the last token's slot emptied, its key and value handed to the launch
        encoded = [[p[:, :, n - 1:n] for p in parts] for parts in (cache.keys, cache.values)]
        mx.eval(encoded)
        for p in cache.keys + cache.values:
            p[:, :, n - 1:n] = 0
        mx.eval(cache.keys, cache.values)
        last = rand((B, hkv, total, d), 1)[:, :, -1:], rand((B, hkv, total, d), 2)[:, :, -1:]
        kv = cache.compressed()
        kv.new = last
    got = kernels.attend(q, kv, scale=d**-0.5, sinks=sinks)
    assert got.dtype == dtype and got.shape == q.shape
    got = got.astype(mx.float32)
    if new:  # the launch wrote the slot in place: evaluated, the buffers hold it
        mx.eval(got)
        kv.new = None
        for codec, parts, (words, norms) in ((kc, cache.keys, encoded[0]), (vc, cache.values, encoded[1])):
            assert code_agreement(codec, parts[0][:, :, n - 1:n], words) >= 0.99
            assert mx.allclose(parts[1][:, :, n - 1:n], norms, rtol=1e-3).item()
    with mx.stream(mx.cpu):  # exact float32 references (the GPU's matmuls are TF32-like)
        q32 = q.astype(mx.float32)
        ref = reference.attend(q32, kv, d**-0.5, sinks=sinks)
        ks, vs = cache.fetch()
        decoded = mx.fast.scaled_dot_product_attention(q32, ks, vs, scale=d**-0.5, sinks=sinks)
    # The fused route (plain, calibrated) computes in fp32 inside the kernel. fp16_regions keeps
    # mx glue around it (q @ R, output @ Rᵀ) that runs as GPU matmuls at TF32-like precision:
    # on an H100 it measured 2.03–2.14e-3 at 20000 tokens (float16 output included); with dense
    # random rotations instead of Hadamard ones, 3.15e-3 on an H200.
    tol = 3e-3 if case == "fp16_regions" else 2e-3
    close(got, ref, tol=tol)
    close(got, decoded, tol=tol)


def code_agreement(codec: ScalarCodec, words: mx.array, expected: mx.array) -> float:
    """Fraction of equal codes between two words arrays [..., W] of ``codec`` (codes that differ
    must be neighbours: a coordinate on a boundary rounds either way)."""
    a, b = unpack(words, codec.layout).astype(mx.int32), unpack(expected, codec.layout).astype(mx.int32)
    assert mx.max(mx.abs(a - b)).item() <= 1
    return mx.mean(a == b).item()


@pytest.mark.skipif(kernels.backend() == "cpu", reason="needs a GPU backend (custom kernels)")
@pytest.mark.parametrize("d,key_bits,value_bits,case", [(128, 4, 4, "plain"), (64, 4, 4, "calibrated"),
                                                          (128, 2, 4, "calibrated"), (64, 2, 2, "plain")])
def test_append_kernel_writes_what_encode_gives(d, key_bits, value_bits, case):
    """One decode step's key and value, encoded by the append kernel into slot 5 of cache buffers
    in place, against ScalarCodec.encode on the CPU (exact float32): the same codes but for
    coordinates on a boundary, the same norms, the other slots untouched."""
    hkv, B, N, slot = 3, 2, 8, 5
    codecs = [turboquant_mse.make_codec(hkv, d, key_bits, 0), turboquant_mse.make_codec(hkv, d, value_bits, 1)]
    if case == "calibrated":  # per-coordinate codebooks, a mean, dense rotations (the kernel's matrix path)
        codecs = [per_coordinate_codec(codecs[0], 5, True), per_coordinate_codec(codecs[1], 8, True)]
    xs = [(3 * rand((B, hkv, 1, d), seed)).astype(mx.float16) for seed in (1, 2)]
    parts = [[mx.zeros((B, hkv, N, c.layout.words), mx.uint32), mx.zeros((B, hkv, N), mx.float16)] for c in codecs]
    done = kernels.append(*xs, *codecs, *parts, slot)
    assert done is not None
    for codec, x, (words, norms) in zip(codecs, xs, parts):
        words, norms = mx.depends([words, norms], done)
        with mx.stream(mx.cpu):
            expected_words, expected_norms = codec.encode(x)
        others = mx.concatenate([words[:, :, :slot], words[:, :, slot + 1:]], axis=2)
        assert mx.all(others == 0).item() and mx.all(norms[:, :, slot + 1:] == 0).item()
        assert mx.allclose(norms[:, :, slot:slot + 1], expected_norms, rtol=1e-3).item()
        assert code_agreement(codec, words[:, :, slot:slot + 1], expected_words) >= 0.99


@pytest.mark.skipif(kernels.backend() == "cpu", reason="needs a GPU backend (custom kernels)")
def test_fast_cache_appends_decode_steps_with_the_kernel(monkeypatch, dispatcher):
    """A fast cache hands each decode step's key and value to the decode launch, which encodes
    them (prefill and buffer growth keep the mx encoder); a step read before its attention
    (here: two updates in a row) goes through the append kernel. Each launch sees the step's
    token (missing it would be off by ~1/n), and the codes match a cache that encodes every
    token with mx ops."""
    launches = []
    append = kernels.append
    monkeypatch.setattr(kernels, "append", lambda *a: launches.append(append(*a)) or launches[-1])
    fast, plain = make_cache(fast=True, mean=True), make_cache(fast=False, mean=True)
    fast.step = plain.step = 16  # a buffer growth inside the decode steps
    for i, L in enumerate([12] + [1] * 10):
        k, v = rand((1, HKV, L, D), 10 + i), rand((1, HKV, L, D), 40 + i)
        fast.update_and_fetch(k, v)
        plain.update_and_fetch(k, v)
        if i == 7:  # no attention in between: the next update flushes this token
            continue
        q = rand((1, HQ, 1, D), 70 + i)
        got = fast.attend(q, None, None, scale=D**-0.5)
        assert fast.pending is None
        mx.eval(got)  # the decode launch wrote the token: evaluated, mx ops may read the codes
        with mx.stream(mx.cpu):  # exact float32, from the codes as they now are
            close(got, reference.attend(q, fast.compressed(), D**-0.5), tol=2e-3)
    assert fast.coded == plain.coded == 22
    assert len(launches) == 1  # step 7's token; step 5 (token 17) grew the buffers (mx encoder)
    (fk, fv), (pk, pv) = fast.state[:2], plain.state[:2]  # state waits for the appends
    for f, p, codec in ((fk, pk, fast.key_codec), (fv, pv, fast.value_codec)):
        assert code_agreement(codec, f[0], p[0]) >= 0.99
        assert mx.allclose(f[1], p[1], rtol=1e-3).item()


def test_cache_settles_appends_before_mx_ops_read_the_buffers(monkeypatch, dispatcher):
    """The cache's side of the in-place writes, on any backend (kernels.append faked with mx ops
    writing the step's codes into the buffers, kernels.appends faked true): a handed-off decode
    step stays pending until the GPU decode launch takes it, or an mx reader (attention off the
    kernel, fetch, state) flushes it with the append and evaluates that; what they read is what
    a cache encoding every token itself holds."""
    def fake_append(keys, values, key_codec, value_codec, key_parts, value_parts, slot):
        for parts, codec, x in ((key_parts, key_codec, keys), (value_parts, value_codec, values)):
            for buf, part in zip(parts, codec.encode(x)):
                buf[:, :, slot:slot + 1] = part  # updates the array objects the cache holds
        return mx.array([0.0])

    monkeypatch.setattr(kernels, "append", fake_append)
    monkeypatch.setattr(kernels, "appends", lambda *a: True)
    fast, plain = make_cache(fast=True), make_cache(fast=False)
    # On a GPU the decode kernel encodes step 1's token (slot 5): a coordinate on a boundary may
    # round the other way than the mx encoder, so there that token's codes agree to 99%.
    q = rand((1, HQ, 1, D), 5)
    for i, L in enumerate([5, 1, 1, 1]):
        k, v = rand((1, HKV, L, D), 80 + i), rand((1, HKV, L, D), 90 + i)
        fast.update_and_fetch(k, v)
        plain.update_and_fetch(k, v)
        assert (fast.pending is not None) == (L == 1)
        if i == 1:
            on_gpu_kernel = kernels.backend() != "cpu" and kernels._fused_for(q, fast.compressed(), None) is not None
            agree = 0.99 if on_gpu_kernel else 1.0
            got = fast.attend(q, None, None, scale=D**-0.5)
            assert (fast.unsettled is None) != on_gpu_kernel
            mx.eval(got)  # the codes as the step left them (the state check below compares them)
            with mx.stream(mx.cpu):
                close(got, reference.attend(q, fast.compressed(), D**-0.5), tol=2e-3)
        if i == 2:
            others = mx.array([j for j in range(7) if j != 5 or not on_gpu_kernel])
            for a, b in zip(fast.fetch(), plain.fetch()):
                assert fast.unsettled is None
                assert mx.array_equal(mx.take(a, others, axis=2), mx.take(b, others, axis=2)).item()
    state = fast.state
    assert fast.unsettled is None and fast.coded == 8
    for f, p, codec in ((state[0], plain.state[0], fast.key_codec), (state[1], plain.state[1], fast.value_codec)):
        assert code_agreement(codec, f[0], p[0]) >= agree
        assert mx.allclose(f[1], p[1], rtol=1e-3).item()


def test_cpu_kernel_falls_back_to_mx_ops(monkeypatch, tmp_path):
    """No C kernel on the CPU (VELOX_CPU_KERNEL=0, or a compiler that fails): attention runs the
    mx reference, a failed build says so once and leaves no library behind."""
    monkeypatch.setenv("VELOX_CACHE_DIR", str(tmp_path))
    cache = make_cache(fast=True)
    cache.update_and_fetch(rand((1, HKV, 40, D), 1), rand((1, HKV, 40, D), 2))
    q = rand((1, HQ, 1, D), 3)
    try:
        monkeypatch.setenv("VELOX_CPU_KERNEL", "0")
        cpu.library.cache_clear()
        assert cpu.library() is None and not cpu.supports(q, cache.compressed(), None)
        monkeypatch.setenv("VELOX_CPU_KERNEL", "1")
        monkeypatch.setenv("CC", "false")  # a compiler that always fails
        cpu.library.cache_clear()
        with pytest.warns(UserWarning, match="could not compile"):
            assert cpu.library() is None
        assert not any((tmp_path / "kernels").iterdir())
        if kernels.backend() == "cpu":
            assert kernels._fused_for(q, cache.compressed(), None) is None
    finally:
        cpu.library.cache_clear()


def test_launch_plans_are_built_once_per_codec_pair():
    """A decode launch's fixed arguments are built once per codec pair and settings; a plan holds
    its value codec weakly, so a new codec gets its own plan and a dropped one is freed."""
    import gc
    import weakref

    from velox.kernels.fused import _plan
    k, v = turboquant_mse.make_codec(HKV, D, 4, 0), turboquant_mse.make_codec(HKV, D, 4, 1)
    p = _plan(k, v, 3, D, D**-0.5, True, False, mx.float16, 12288)
    assert _plan(k, v, 3, D, D**-0.5, True, False, mx.float16, 12288) is p
    assert dict(p.template)["R"] == 3 and dict(p.template)["PSAME"] is True and p.pair_words == 8192
    assert _plan(k, v, 3, D, D**-0.5, True, False, mx.float16, 0).pair_words == 0  # no pair tables (Metal)
    partial = _plan(k, v, 3, D, None, False, False, mx.float32, 12288)
    assert dict(partial.template)["ROTATE"] is False and partial.rotation[0] is partial.dummy
    v2 = turboquant_mse.make_codec(HKV, D, 2, 1)
    mixed = _plan(k, v2, 3, D, D**-0.5, True, False, mx.float16, 12288)
    assert dict(mixed.template)["VB"] == 2 and not dict(mixed.template)["PSAME"] and mixed.pair_words == 8192 + 512
    # pair tables take their shared memory from the scores': T = 1024 tokens at 64k fits next to
    # one 4-bit table (8192 words + 4 × 1024 = 48 KiB), 512 next to a 4-bit and a 2-bit one
    from velox.kernels.fused import FusedDecode
    cuda = FusedDecode("cuda", ps_budget=4096, target_blocks=264, smem_words=12288)
    assert cuda.tokens_per_block(65536, 8, 4, p.pair_words) == 1024
    assert cuda.tokens_per_block(65536, 8, 4, mixed.pair_words) == 512
    dropped = weakref.ref(v2)
    del v2
    gc.collect()
    assert dropped() is None


@pytest.mark.parametrize("d,bits,padded", [(D, 2, True), (80, 1, False), (72, 2, False), (48, 1, False)])
def test_codecs_the_kernels_cannot_index_stay_off_them(d, bits, padded, dispatcher):
    """Every kernel reads levels [H, D, 2^bits] and a token's codes as D·bits/32 whole words. A
    one-width codec whose level table is padded past 2^bits (as mixed widths pad), or whose D
    codes end inside a word (1 bit at head_dim 80: 2.5 words), runs the mx reference instead:
    attention from its codes equals attention over the decoded history (the C kernel gave NaN
    or 14-20x errors here)."""
    codec = turboquant_mse.make_codec(HKV, d, bits, 0)
    if padded:
        levels = mx.concatenate([codec.levels, mx.repeat(codec.levels[..., -1:], 12, axis=-1)], axis=-1)
        codec = ScalarCodec(rotation=codec.rotation, scale=codec.scale, levels=levels, bits=codec.bits)
    fast = VeloxKVCache(codec, codec, method="turboquant_mse", fast=True)
    fast.update_and_fetch(rand((1, HKV, 40, d), 1), rand((1, HKV, 40, d), 2))
    fast.update_and_fetch(rand((1, HKV, 1, d), 3), rand((1, HKV, 1, d), 4))
    q = rand((1, HQ, 1, d), 5)
    assert not kernels.appends(rand((1, HKV, 1, d), 3), codec, codec)
    assert kernels._fused_for(q, fast.compressed(), None) is None
    close(fast.attend(q, None, None, scale=d**-0.5),
          mx.fast.scaled_dot_product_attention(q, *fast.fetch(), scale=d**-0.5))
