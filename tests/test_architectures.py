"""Architectures and hybrid models end to end: a tiny random mlx_lm model of each family,
with the RoPE variant it uses, converted (turboquant_mse + commvq), loaded with
velox.load and generated from; layers whose native cache is not a plain KVCache
(sliding window, linear attention) keep that cache."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache, make_prompt_cache

import velox
from conftest import write_tiny_model
from velox.convert.pipeline import convert
from velox.methods.rope import PROBE_POSITIONS, PreRopeCodec, RopeInverse, layer_rope, rope_matrices
from velox.runtime.cache import ExactCodec, VeloxKVCache

METHODS = ("turboquant_mse", "commvq")  # data-free, and the calibrated pre-RoPE method built on RoPE pairs
WINDOW = 16  # gemma3's sliding window: prompts and generations go past it
BASE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=49152, tie_word_embeddings=True,
            max_position_embeddings=2048)

# name -> (model_type, config, rope expected on coded layers (class, rotated dims, traditional),
#          {layer: native cache class} for layers velox must leave alone)
ARCHS = {
    "llama-llama3": ("llama", dict(BASE, head_dim=32, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)), ("Llama3RoPE", 32, False), {}),
    "mistral-traditional": ("mistral", dict(BASE, head_dim=32, rope_traditional=True),
                            ("RoPE", 32, True), {}),
    # yarn with factor 4: its mscale (≈1.14) scales the rotated dims, which the inverse divides out
    "qwen2-yarn": ("qwen2", dict(BASE, rope_theta=1e6, rope_scaling=dict(
        type="yarn", factor=4.0, original_max_position_embeddings=512)), ("YarnRoPE", 16, False), {}),
    "qwen3": ("qwen3", dict(BASE, head_dim=32, rope_theta=1e6), ("RoPE", 32, False), {}),
    # Phi-4-mini's layout: partial rotary (3/4 of head_dim) with longrope's scaled rope
    "phi3-partial-longrope": ("phi3", dict(
        BASE, hidden_size=128, partial_rotary_factor=0.75, max_position_embeddings=8192,
        original_max_position_embeddings=64, rope_scaling=dict(
            type="longrope", long_factor=[1.0 + 0.25 * i for i in range(12)], short_factor=[1.0] * 12)),
        ("SuScaledRoPE", 24, False), {}),
    # qwen (v1) names its rope module rotary_emb
    "qwen1-rotary_emb": ("qwen", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, kv_channels=16,
                                      intermediate_size=256, vocab_size=49152, max_position_embeddings=2048),
                         ("RoPE", 16, False), {}),
    # sliding layers 0, 2 (RotatingKVCache), global layers 1, 3 with linear rope scaling
    "gemma3_text-sliding": ("gemma3_text", dict(
        BASE, num_hidden_layers=4, head_dim=32, sliding_window=WINDOW, sliding_window_pattern=2,
        query_pre_attn_scalar=32, rope_scaling=dict(rope_type="linear", factor=8.0)),
        ("RoPE", 32, False), {0: RotatingKVCache, 2: RotatingKVCache}),
    # soft-capped scores computed by the model itself (its attention never reaches the dispatcher)
    "gemma2-softcap": ("gemma2", dict(BASE, head_dim=32, query_pre_attn_scalar=32, attn_logit_softcapping=50.0,
                                      final_logit_softcapping=30.0), ("RoPE", 32, False), {}),
    # gated-delta linear attention at layers 0, 2 (ArraysCache), full attention with 1/4 rotary at 1, 3
    "qwen3_next-hybrid": ("qwen3_next", dict(
        BASE, num_hidden_layers=4, head_dim=32, rope_theta=1e6, partial_rotary_factor=0.25,
        full_attention_interval=2, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=0, num_experts_per_tok=1,
        decoder_sparse_step=1, shared_expert_intermediate_size=64, mlp_only_layers=[],
        moe_intermediate_size=64), ("RoPE", 8, False), {0: ArraysCache, 2: ArraysCache}),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, smollm2_path, tmp_path_factory):
    """(name, converted velox folder) for one architecture, converted once per module."""
    model_type, config, _, _ = ARCHS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    src = write_tiny_model(root / "hf", smollm2_path, model_type, **config)
    convert(str(src), str(root / "kv"), kv=",".join(METHODS), calib_tokens=256, calib_seq_len=64, progress=False)
    return request.param, root / "kv"


def native_caches(model) -> list:
    """The model's own caches (velox.load keeps its factory beside the one it installs)."""
    make = model._velox_native_make_cache
    return make() if make else [KVCache() for _ in model.layers]


def coded_layers(name: str, model) -> list[int]:
    """Layers velox codes: all but the architecture's native-cache layers."""
    return [i for i in range(len(model.layers)) if i not in ARCHS[name][3]]


def chunked_logits(model, caches, n: int = 40) -> mx.array:
    """Last logits of a prefill in two chunks (24 + 8 tokens, past the sliding window) and of
    each of n − 32 single-token decode steps -> [steps, vocab]; the caches are filled."""
    ids = mx.array(np.random.default_rng(0).integers(0, 49152, n))[None]
    out = [model(ids[:, :24], cache=caches)[:, -1], model(ids[:, 24:32], cache=caches)[:, -1]]
    out += [model(ids[:, t:t + 1], cache=caches)[:, -1] for t in range(32, n)]
    return mx.concatenate(out).astype(mx.float32)


def rel_err(a: mx.array, b: mx.array) -> float:
    return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


def test_kv_quant_marks_native_layers(arch):
    """Every method lists the sliding / linear-attention layers as native and codes the rest."""
    name, folder = arch
    kvq = json.loads((folder / "config.json").read_text())["kv_quant"]
    native = ARCHS[name][3]
    for method in METHODS:
        layers = kvq["methods"][method]["layers"]
        assert [e["layer"] for e in layers if e.get("cache") == "native"] == sorted(native)
        assert all("key_bits" in e for e in layers if e["layer"] not in native)


@pytest.mark.parametrize("method", METHODS)
def test_generate_with_velox_and_native_caches(arch, method):
    """velox.load + mlx_lm.generate past the sliding window: coded layers get VeloxKVCache,
    the others keep exactly their native cache type and see every token."""
    name, folder = arch
    model, tok = velox.load(str(folder), kv=method)
    cache = make_prompt_cache(model)
    native = ARCHS[name][3]
    for i, c in enumerate(cache):
        if i in native:
            assert type(c) is native[i]
        else:
            assert isinstance(c, VeloxKVCache) and c.method == method
    prompt = "The quick brown fox jumps over the lazy dog. " * 2
    text = mlx_lm.generate(model, tok, prompt=prompt, max_tokens=16, prompt_cache=cache)
    assert isinstance(text, str) and text
    coded = [c for c in cache if isinstance(c, VeloxKVCache)]
    assert coded[0].offset > 2 * WINDOW and all(c.offset == coded[0].offset for c in coded)
    for i, cls in native.items():
        if cls is RotatingKVCache:  # it really slid: it saw every token and holds only its window
            assert cache[i].offset == coded[0].offset and cache[i].keys.shape[2] <= WINDOW
        else:  # the linear-attention state was filled
            assert cache[i][1] is not None


def test_rope_variant_and_exact_inverse(arch):
    """Each coded layer has the RoPE variant the config asks for; RopeInverse undoes it exactly
    at any offset, and the rope turns each of its pairs as one complex number with nothing
    mixed across pairs (what commvq's RoPE-commuting codebooks and pre-RoPE coding rely on)."""
    name, folder = arch
    model, _ = velox.load(str(folder), kv="turboquant_mse")
    cls, rotated, traditional = ARCHS[name][2]
    head_dim = json.loads((folder / "config.json").read_text())["kv_quant"]["model"]["head_dim"]
    for i in coded_layers(name, model):
        rope = layer_rope(model, i)
        assert type(rope).__name__ == cls
        assert getattr(rope, "dims", getattr(rope, "dim", None)) == rotated
        assert getattr(rope, "traditional", False) == traditional
        inv = RopeInverse(rope, head_dim)
        x = mx.random.normal((1, 2, 7, head_dim), key=mx.random.key(i))
        for offset in (0, 13, 1500):
            assert mx.max(mx.abs(inv.unrope(rope(x, offset=offset), offset) - x)).item() < 1e-5
        mats = rope_matrices(rope, PROBE_POSITIONS, head_dim)  # [P, D, D]
        a, b = inv.pairs.T
        in_pairs = np.zeros((head_dim, head_dim), bool)
        for p, q in inv.pairs:
            in_pairs[np.ix_([p, q], [p, q])] = True
        assert np.abs(mats[:, ~in_pairs]).max() < 1e-6
        np.testing.assert_allclose(mats[:, a, a], mats[:, b, b], atol=1e-6)
        np.testing.assert_allclose(mats[:, a, b], -mats[:, b, a], atol=1e-6)
        assert (np.abs(mats[:, a, b]).max(axis=0) > 1e-6).sum() == rotated // 2  # the rotated dims, no more


def test_exact_pre_rope_cache_matches_native(arch):
    """A cache that stores keys in the pre-RoPE frame (the layer's own inverse) without
    quantizing gives the native logits through chunked prefill and decode: the positions
    it un-rotates and re-rotates at agree with the model's."""
    name, folder = arch
    model, _ = velox.load(str(folder), kv="turboquant_mse")
    head_dim = json.loads((folder / "config.json").read_text())["kv_quant"]["model"]["head_dim"]
    exact = native_caches(model)
    for i in coded_layers(name, model):
        exact[i] = VeloxKVCache(PreRopeCodec(ExactCodec(), RopeInverse(layer_rope(model, i), head_dim)), ExactCodec())
    ref = chunked_logits(model, native_caches(model))
    assert mx.max(mx.abs(chunked_logits(model, exact) - ref)).item() < 1e-4 * mx.max(mx.abs(ref)).item() + 1e-5


@pytest.mark.parametrize("method, key_err", [("turboquant_mse", 0.25), ("commvq", 0.6)])
def test_coded_cache_close_to_native(arch, method, key_err):
    """4-bit turboquant_mse and 2-bit commvq keys (4-bit values) against the native cache after
    chunked prefill + decode: the first coded layer's decoded keys and values are within the
    codec's error (commvq's measured in the frame it was calibrated in), logits close."""
    name, folder = arch
    model, _ = velox.load(str(folder), kv=method)
    native, coded = native_caches(model), make_prompt_cache(model)
    ref, got = chunked_logits(model, native), chunked_logits(model, coded)
    first = coded_layers(name, model)[0]  # its inputs are exact, so its error is the codec's own
    keys, values = coded[first].fetch()
    n = coded[first].offset
    assert rel_err(keys, native[first].keys[:, :, :n]) < key_err
    assert rel_err(values, native[first].values[:, :, :n]) < 0.2
    cos = mx.sum(ref * got, -1) / (mx.linalg.norm(ref, axis=-1) * mx.linalg.norm(got, axis=-1))
    assert mx.min(cos).item() > (0.9 if method == "turboquant_mse" else 0.6)


def test_model_without_rope(smollm2_path, tmp_path):
    """gpt2 (learned positions, no rope module): its keys are pre-RoPE as they come, so data-free
    and pre-RoPE methods alike convert and run, the latter with the identity as RoPE inverse
    (a key codes the same at every position)."""
    src = write_tiny_model(tmp_path / "hf", smollm2_path, "gpt2", n_ctx=256, n_embd=64, n_head=2, n_layer=2,
                           n_positions=256, layer_norm_epsilon=1e-5, vocab_size=49152)
    convert(str(src), str(tmp_path / "kv"), kv="turboquant_mse,commvq", calib_tokens=256, calib_seq_len=64,
            progress=False)
    for method in ("turboquant_mse", "commvq"):
        model, tok = velox.load(str(tmp_path / "kv"), kv=method)
        cache = make_prompt_cache(model)
        assert all(isinstance(c, VeloxKVCache) for c in cache)
        assert mlx_lm.generate(model, tok, prompt="Hello", max_tokens=4, prompt_cache=cache)
    codec = cache[0].key_codec
    k = mx.random.normal((1, 2, 1, 32))
    assert all(mx.array_equal(a, b).item() for a, b in zip(codec.encode(k, offset=0), codec.encode(k, offset=9)))


def test_layout_says_which_layers_attend_from_their_cache(arch):
    """Layers whose attention reaches velox's dispatcher with their cache's own keys and values
    may take the fast path; gemma2 computes its soft-capped scores itself, so none of its do."""
    from velox.runtime.layers import cache_layout

    name, folder = arch
    model, _ = velox.load(str(folder), kv="turboquant_mse")
    layout = cache_layout(model)
    coded = coded_layers(name, model)
    assert [i for i, c in enumerate(layout.coded) if c] == coded
    expected = not name.startswith("gemma2")
    assert all(layout.attends_from_cache[i] == expected for i in coded)
    fast = [c.fast for c in make_prompt_cache(model) if isinstance(c, VeloxKVCache)]
    assert fast and all(f == expected for f in fast)


def test_fast_and_decode_paths_track_the_native_cache(arch):
    """Chunked prefill + decode logits with fast=True and fast=False: the two paths agree (same
    codes, float noise), and both are within the codes' error of the native cache."""
    name, folder = arch
    model, _ = velox.load(str(folder), kv="turboquant_mse", fast=True)
    ref = chunked_logits(model, native_caches(model))
    fast = chunked_logits(model, make_prompt_cache(model))
    model_slow, _ = velox.load(str(folder), kv="turboquant_mse", fast=False)
    slow = chunked_logits(model_slow, make_prompt_cache(model_slow))
    assert rel_err(fast, slow) < 1e-2
    assert rel_err(slow, ref) < 0.5


def test_self_check_refuses_a_fast_path_the_model_bypasses(smollm2_path, tmp_path, monkeypatch):
    """Were gemma2's layers given the fast path (their caches returning only the new tokens to
    a model that attends to what it is handed), velox.load refuses instead of generating from
    a cache it never reads."""
    from velox.runtime import loader
    from velox.runtime.layers import UnsupportedArchitecture, cache_layout

    model_type, config, _, _ = ARCHS["gemma2-softcap"]
    src = write_tiny_model(tmp_path / "hf", smollm2_path, model_type, **config)
    convert(str(src), str(tmp_path / "kv"), kv="turboquant_mse", calib_tokens=64, calib_seq_len=32, progress=False)

    def wrong_layout(m):
        layout = cache_layout(m)
        layout.attends_from_cache = list(layout.coded)
        return layout

    monkeypatch.setattr(loader, "cache_layout", wrong_layout)
    with pytest.raises(UnsupportedArchitecture, match="'gemma2': turboquant_mse's attention from the codes gives logits"):
        velox.load(str(tmp_path / "kv"))
    velox.load(str(tmp_path / "kv"), fast=False)  # the decode path is right, and loads
