"""Capture the activations every calibration needs, per attention layer.

A capture cache is installed in place of each plain KVCache: it records the keys
(after RoPE) and values the model hands to its cache, and, through the attention
dispatcher, the queries. Keys before RoPE are recovered exactly by inverting the
layer's own rope module at each position.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, create_attention_mask, make_prompt_cache
from tqdm import tqdm

from ..methods.base import LayerActivations
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


def attention_module(layer):
    """The attention submodule of a transformer block (``self_attn`` in mlx_lm models)."""
    for name in ("self_attn", "attention", "attn"):
        if hasattr(layer, name):
            return getattr(layer, name)
    raise ValueError(f"cannot find the attention module of {type(layer).__name__}")


def rope_matrices(rope, positions: int, head_dim: int) -> np.ndarray:
    """M [P, D, D] with rope(k at position p) = M[p] @ k, probed from the module itself.

    Probing with the identity handles any linear rope (plain, traditional, llama3,
    yarn with its mscale, partial rotary) without knowing its formula.
    """
    eye = mx.eye(head_dim, dtype=mx.float32)
    probe = mx.broadcast_to(eye[:, None, None, :], (head_dim, 1, positions, head_dim))
    out = rope(probe, offset=0)  # out[b, 0, p, i] = M[p][i, b]
    return np.array(out[:, 0].astype(mx.float32)).transpose(1, 2, 0).astype(np.float64)


def inverse_rope(keys: np.ndarray, rope_inv: np.ndarray) -> np.ndarray:
    """keys [N, H, D] at positions 0..N-1 (per sequence) -> keys before RoPE."""
    return np.einsum("pij,phj->phi", rope_inv, keys.astype(np.float64))


SHIFT_CHUNK = 64


def rope_at_random_positions(rope, pre: np.ndarray, max_position: int, rng: np.random.Generator) -> np.ndarray:
    """Re-apply RoPE to pre-RoPE keys [L, H, D] with a random start per chunk of 64."""
    out = np.empty_like(pre, dtype=np.float32)
    for s in range(0, len(pre), SHIFT_CHUNK):
        chunk = mx.array(pre[s : s + SHIFT_CHUNK].astype(np.float32)).transpose(1, 0, 2)[None]
        offset = int(rng.integers(0, max(1, max_position - len(chunk[0, 0]))))
        out[s : s + SHIFT_CHUNK] = np.array(rope(chunk, offset=offset)[0].transpose(1, 0, 2))
    return out


def plain_layers(model) -> list[bool]:
    """True for layers whose native cache is a plain KVCache (the ones velox replaces)."""
    return [type(c) is KVCache for c in make_prompt_cache(model)]


def capture(model, sequences: np.ndarray, max_position: int = 8192, seed: int = 0,
            progress: bool = True) -> list[LayerActivations | None]:
    """Run ``sequences [n_seq, L]`` through the model; one LayerActivations per layer.

    max_position: the context length keys_any_position spans (the model's).

    Layers that are not plain KVCache layers get ``None``. Arrays are float16 to
    keep memory bounded (8192 tokens of SmolLM2: ~0.5 GB).
    """
    plain = plain_layers(model)
    n_seq, L = sequences.shape
    layers = model.layers
    store = [dict(keys=[], pre=[], anypos=[], values=[], queries=[]) if p else None for p in plain]
    rng = np.random.default_rng(seed)
    rope_inv: list[np.ndarray | None] = [None] * len(layers)
    attention.install()
    try:
        for s in tqdm(range(n_seq), desc="capture", disable=not progress):
            native = make_prompt_cache(model)
            caches = [CaptureCache() if p else c for p, c in zip(plain, native)]
            model(mx.array(sequences[s : s + 1]), cache=caches)
            recorded = [(c.keys[0], c.values[0], c.queries[0]) for c in caches if isinstance(c, CaptureCache)]
            mx.eval(recorded)
            for i, c in enumerate(caches):
                if not isinstance(c, CaptureCache):
                    continue
                k = np.array(c.keys[0][0].astype(mx.float32)).transpose(1, 0, 2)  # [L, H, D]
                rope = attention_module(layers[i]).rope
                if rope_inv[i] is None:
                    rope_inv[i] = np.linalg.inv(rope_matrices(rope, L, k.shape[-1]))
                st = store[i]
                pre = inverse_rope(k, rope_inv[i])
                st["keys"].append(k.astype(np.float16))
                st["pre"].append(pre.astype(np.float16))
                st["anypos"].append(rope_at_random_positions(rope, pre, max_position, rng).astype(np.float16))
                st["values"].append(np.array(c.values[0][0].astype(mx.float32)).transpose(1, 0, 2).astype(np.float16))
                st["queries"].append(np.array(c.queries[0][0].astype(mx.float32)).transpose(1, 0, 2).astype(np.float16))
    finally:
        attention.uninstall()
    positions = np.tile(np.arange(L), n_seq)
    out = []
    for i, st in enumerate(store):
        if st is None:
            out.append(None)
            continue
        acts = LayerActivations(
            keys=np.concatenate(st["keys"]), keys_pre_rope=np.concatenate(st["pre"]),
            keys_any_position=np.concatenate(st["anypos"]),
            values=np.concatenate(st["values"]), queries=np.concatenate(st["queries"]),
            positions=positions,
        )
        bad = [n for n in ("keys", "values", "queries") if not np.isfinite(getattr(acts, n)).all()]
        if bad:
            raise FloatingPointError(f"layer {i}: NaN/Inf in captured {', '.join(bad)}")
        out.append(acts)
    return out
