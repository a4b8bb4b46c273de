"""Capture the activations every calibration needs, per attention layer.

A capture cache is installed in place of each plain KVCache: it records the keys
(after RoPE) and values the model hands to its cache, and, through the attention
dispatcher, the queries. Keys before RoPE are recovered exactly by inverting the
layer's own rope module (``RopeInverse``, the same inverse caches use at run time).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, create_attention_mask, make_prompt_cache
from tqdm import tqdm

from ..methods.base import LayerActivations
from ..methods.rope import RopeInverse, layer_rope
from ..runtime import attention


class CaptureCache:
    """Records what one layer's cache receives; attention itself stays exact."""

    def __init__(self):
        self.offset = 0
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []
        self.queries: list[mx.array] = []

    def update_and_fetch(self, keys, values):
        if self.offset:
            raise RuntimeError("capture runs one whole sequence per fresh cache")
        self.offset = keys.shape[2]
        self.keys.append(keys)
        self.values.append(values)
        return keys, values

    def attend(self, queries, keys, values, scale, mask, sinks=None):
        self.queries.append(queries)
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale,
                                                    mask=mask, sinks=sinks)

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)


def plain_layers(model) -> list[bool]:
    """True for layers whose native cache is a plain KVCache (the ones velox replaces)."""
    return [type(c) is KVCache for c in make_prompt_cache(model)]


def check_finite(layer: int, sequence: int, parts: tuple[tuple[str, np.ndarray], ...]) -> None:
    """NaN/Inf in what a layer captured (after the float16 cast, which overflows past 65504)
    would poison every statistic fitted from it: stop at the first sequence that has one."""
    bad = [{"pre": "pre-RoPE keys"}.get(name, name) for name, x in parts if not np.isfinite(x).all()]
    if bad:
        raise ValueError(f"layer {layer}: NaN/Inf in captured {', '.join(bad)} (calibration sequence {sequence}); "
                         "the model's activations are not finite there, so velox cannot calibrate on them")


def layer_unrope(model, layer: int, head_dim: int):
    """(keys, offset) -> pre-RoPE keys for one layer. A layer without a rope module
    (learned or no positions: gpt2, NoPE layers) hands its cache keys that are already
    pre-RoPE, so they are kept as they are."""
    rope = layer_rope(model, layer)
    return RopeInverse(rope, head_dim).unrope if rope is not None else (lambda x, offset: x)


def capture(model, sequences: np.ndarray, progress: bool = True) -> list[LayerActivations | None]:
    """Run ``sequences [n_seq, L]`` through the model; one LayerActivations per layer.

    Layers that are not plain KVCache layers get ``None``. Arrays are float16 to
    keep memory bounded (8192 tokens of SmolLM2: ~0.5 GB).
    """
    plain = plain_layers(model)
    n_seq, L = sequences.shape
    store = [dict(keys=[], pre=[], values=[], queries=[]) if p else None for p in plain]
    unrope = {}  # layer -> its keys' RoPE inverse (x, offset) -> x, built on first use
    attention.install()
    try:
        for s in tqdm(range(n_seq), desc="capture", disable=not progress):
            native = make_prompt_cache(model)
            caches = [CaptureCache() if p else c for p, c in zip(plain, native)]
            model(mx.array(sequences[s : s + 1]), cache=caches)
            recorded = {}
            for i, c in enumerate(caches):
                if isinstance(c, CaptureCache):
                    if i not in unrope:
                        unrope[i] = layer_unrope(model, i, c.keys[0].shape[-1])
                    k = c.keys[0].astype(mx.float32)
                    recorded[i] = (k, unrope[i](k, 0), c.values[0], c.queries[0])
            mx.eval(recorded)
            for i, arrays in recorded.items():
                # [1, H, L, D] -> [L, H, D] float16
                k, pre, v, q = (np.array(x[0].astype(mx.float32)).transpose(1, 0, 2).astype(np.float16)
                                for x in arrays)
                parts = (("keys", k), ("pre", pre), ("values", v), ("queries", q))
                check_finite(i, s, parts)
                for name, x in parts:
                    store[i][name].append(x)
    finally:
        attention.uninstall()
    positions = np.tile(np.arange(L), n_seq)
    out = []
    for i in range(len(store)):
        st, store[i] = store[i], None  # free each layer's pieces as soon as they are joined
        if st is None:
            out.append(None)
            continue
        join = lambda name: np.concatenate(st.pop(name))
        acts = LayerActivations(keys=join("keys"), keys_pre_rope=join("pre"), values=join("values"),
                                queries=join("queries"), positions=positions)
        out.append(acts)
    return out
