"""Attention from the codes of pre-RoPE keys (spectral with basis="pairs") against the decoded
history: sinks, window, GQA ratios, head dims, RoPE variants, RateQuant widths."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.rope_utils import initialize_rope

from velox import kernels
from velox.kernels import reference
from velox.methods import ratequant, spectral
from velox.methods.base import LayerActivations, LayerSpec
from velox.runtime.cache import VeloxKVCache

ROPES = {
    "default": dict(base=10000.0, traditional=False, scaling_config=None),
    "traditional": dict(base=10000.0, traditional=True, scaling_config=None),
    "llama3": dict(base=500000.0, traditional=False, scaling_config={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "yarn": dict(base=10000.0, traditional=False, scaling_config={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
}


def random_acts(hkv: int, hq: int, d: int) -> LayerActivations:
    """Random anisotropic calibration keys (pre-RoPE as given), 2 sequences of 256 tokens."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((512, hkv, d)) * np.linspace(3, 0.2, d)).astype(np.float32)
    return LayerActivations(keys=x, keys_pre_rope=x, values=x, positions=np.tile(np.arange(256), 2),
                            queries=rng.standard_normal((512, hq, d)).astype(np.float32))


def make_rope(kind: str, dims: int):
    """One of ROPES over ``dims`` rotated dims."""
    cfg = ROPES[kind]
    return initialize_rope(dims, cfg["base"], cfg["traditional"], cfg["scaling_config"], 4096)


def calibrated(hkv: int, d: int, rope_kind: str, bits, basis: str = "pairs", partial: float = 1.0):
    """spectral (key codec, value codec) calibrated on random anisotropic keys; bits an int, or
    per-head key widths (RateQuant, values 4 bits)."""
    rope = make_rope(rope_kind, int(d * partial))
    acts = random_acts(hkv, hkv * 2, d)
    if isinstance(bits, int):
        spec = LayerSpec(0, hkv, d, bits, 4, rope=rope)
        return spectral.make_codecs(spectral.calibrate(acts, spec, basis=basis), spec)
    spec = LayerSpec(0, hkv, d, 0, 0, rope=rope)
    tensors = {}
    for b in sorted(set(bits) | {4}):
        wspec = ratequant.width_spec(spectral, spec, b)
        tensors.update({f"bits{b}.{k}": v for k, v in spectral.calibrate(acts, wspec, basis=basis).items()})
    return ratequant.make_mixed_codecs(spectral, tensors, spec, bits, [4] * hkv)


def check(codecs, hq: int, hkv: int, d: int, sink: int = 0, window: int = 0, with_sinks: bool = False):
    """Chunked prefill (causal, array masks) and decode steps: the fast cache's attention equals
    SDPA over the history the decode path gives (same codes)."""
    fast = VeloxKVCache(*codecs, sink=sink, window=window, fast=True)
    plain = VeloxKVCache(*codecs, sink=sink, window=window)
    assert fast.fast
    sinks = mx.random.normal((hq,), key=mx.random.key(99)) if with_sinks else None
    key = iter(range(1000))
    for a, b, mask_kind in [(0, 29, "causal"), (29, 70, "array"), (70, 71, None), (71, 72, None), (72, 75, "causal")]:
        L = b - a
        q, k, v = (mx.random.normal((1, h, L, d), key=mx.random.key(next(key))) for h in (hq, hkv, hkv))
        mask = fast.make_mask(L, return_array=True, window_size=None) if mask_kind == "array" else mask_kind
        k = k * 2.0
        assert fast.update_and_fetch(k, v)[0] is k and fast.codes_only  # nothing decoded
        ks, vs = plain.update_and_fetch(k, v)
        ref = mx.fast.scaled_dot_product_attention(q, ks, vs, scale=d**-0.5, mask=mask, sinks=sinks)
        got = fast.attend(q, k, v, scale=d**-0.5, mask=mask, sinks=sinks)
        # the reference's blocks also for prefill chunks (kernels.attend decodes the history there)
        blocks = reference.attend(q, fast.compressed(), d**-0.5, mask, sinks, block=16)
        for out in (got, blocks):
            err = (mx.max(mx.abs(out - ref)) / mx.max(mx.abs(ref))).item()
            assert err < 5e-5, err


@pytest.mark.parametrize("rope_kind", sorted(ROPES))
@pytest.mark.parametrize("sink,window", [(0, 0), (3, 8)])
def test_pair_basis_attends_from_codes(rope_kind, sink, window, dispatcher):
    check(calibrated(2, 64, rope_kind, 4), 6, 2, 64, sink, window, with_sinks=sink > 0)


@pytest.mark.parametrize("hq,hkv,d", [(2, 2, 64), (8, 2, 128), (8, 1, 256), (16, 2, 64)])
def test_gqa_ratios_and_head_dims(hq, hkv, d, dispatcher):
    check(calibrated(hkv, d, "default", 3), hq, hkv, d)


def test_partial_rotary_and_ratequant_widths(dispatcher):
    check(calibrated(3, 64, "default", 4, partial=0.5), 9, 3, 64, sink=2)
    check(calibrated(3, 64, "yarn", [2, 4, 3]), 9, 3, 64, window=4)


def method_codecs(method: str, bits: int, hq: int, rope_kind: str = "default") -> tuple:
    """(key codec, value codec) of a calibrated method (spectral's full basis, vecinfer, rabitq,
    commvq) for 2 KV heads of 64, calibrated on random keys."""
    from velox.methods import commvq, rabitq, vecinfer

    if method == "spectral":
        return calibrated(2, 64, rope_kind, bits, basis="full")
    spec = LayerSpec(0, 2, 64, bits, 4, rope=make_rope(rope_kind, 64))
    module = {"vecinfer": vecinfer, "rabitq": rabitq, "commvq": commvq}[method]
    options = {"nlist": 8} if method == "rabitq" else {}
    return module.make_codecs(module.calibrate(random_acts(2, hq, 64), spec, **options), spec)


DENSE = [("spectral", 4, "default"), ("spectral", 3, "yarn"), ("vecinfer", 2, "traditional"), ("vecinfer", 1, "default"),
         ("rabitq", 1, "llama3")]


@pytest.mark.parametrize("method,bits,rope_kind", DENSE)
def test_dense_bases_attend_from_codes(method, bits, rope_kind, dispatcher):
    """Bases that mix RoPE pairs decode a block of keys at a time (D² per key, as the decode path,
    but never the whole history): same attention as SDPA over the decoded history."""
    codecs = method_codecs(method, bits, 4, rope_kind)
    assert kernels.supports(*codecs)
    check(codecs, 4, 2, 64, sink=2, window=6, with_sinks=True)


@pytest.mark.parametrize("method,bits,rope_kind", DENSE)
@pytest.mark.parametrize("hq", [2, 8])
def test_cpu_dense_kernel_matches_the_reference(method, bits, rope_kind, hq):
    check_cpu_kernel(method_codecs(method, bits, hq, rope_kind), hq)


@pytest.mark.parametrize("rope_kind,bits,hq", [("default", 4, 6), ("traditional", 3, 2), ("yarn", 2, 8),
                                               ("llama3", 5, 4)])
def test_cpu_kernel_matches_the_reference(rope_kind, bits, hq):
    """The C kernel's partial over pre-RoPE pair-basis codes (variable widths, straddling words,
    positions after a sink) equals the mx reference's, on MLX's CPU backend."""
    check_cpu_kernel(calibrated(2, 64, rope_kind, bits), hq)


def check_cpu_kernel(codecs: tuple, hq: int) -> None:
    """One decode query over 300 coded tokens after a 3-token sink: the C kernel's partial, merged
    by the reference, equals the reference's own."""
    from velox.kernels import cpu

    if cpu.library() is None:
        pytest.skip("no C compiler")
    cache = VeloxKVCache(*codecs, sink=3)
    cache.update_and_fetch(mx.random.normal((1, 2, 300, 64), key=mx.random.key(1)),
                           mx.random.normal((1, 2, 300, 64), key=mx.random.key(2)))
    kv = cache.compressed()
    q = mx.random.normal((1, hq, 1, 64), key=mx.random.key(3))
    with mx.stream(mx.cpu):
        assert cpu.supports(q, kv, None)
        ref = reference.attend(q, kv, 0.125)
        got = reference.attend(q, kv, 0.125, coded_partial=cpu.coded_partial)
    assert (mx.max(mx.abs(got - ref)) / mx.max(mx.abs(ref))).item() < 1e-5


def test_commvq_attends_from_codes(dispatcher):
    """commvq's codebooks commute with RoPE: its blocks of keys decode, turn and score without
    the history being decoded, sinks and window included."""
    codecs = method_codecs("commvq", 2, 4)
    assert kernels.supports(*codecs)
    check(codecs, 4, 2, 64, sink=2, window=6, with_sinks=True)


@pytest.mark.parametrize("bits,hq", [(2, 4), (1, 2), (4, 8)])
def test_cpu_kernel_matches_the_reference_for_commvq(bits, hq):
    check_cpu_kernel(method_codecs("commvq", bits, hq), hq)


def test_hadamard_rotations_are_detected_and_others_go_dense():
    """vecinfer's and rabitq's seeded rotation is diag(s)·H/√D (the kernel's fast transform); any
    other rotation takes the dense D×D path, which must give the same partial."""
    from dataclasses import replace

    from velox.kernels import cpu
    from velox.methods.rotation import randomized_hadamard

    R = np.array(randomized_hadamard(64, 5))
    assert np.allclose(cpu.hadamard_signs(R[None]), R[:, 0])
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((64, 64)))
    assert cpu.hadamard_signs(q[None].astype(np.float32)) is None
    keys, values = method_codecs("vecinfer", 2, 4)
    dense = replace(keys, inner=replace(keys.inner, rotation=mx.array(q.astype(np.float32))))
    assert cpu.dense_tables(dense).rotation is not None and cpu.dense_tables(keys).rotation is None
    check_cpu_kernel((dense, values), 4)
