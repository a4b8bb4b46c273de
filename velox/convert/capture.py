"""Capture the activations every calibration needs, per attention layer.

A capture cache is installed in place of each plain KVCache: it records the keys
(after RoPE) and values the model hands to its cache. Queries come through the attention
dispatcher where the layer's attention reaches it (``CacheLayout.attends_from_cache``),
else from the layer's rope module, which rotates the queries as well as the keys. Keys
before RoPE are recovered exactly by inverting the layer's own rope module
(``RopeInverse``, the same inverse caches use at run time).
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import create_attention_mask
from tqdm import tqdm

from ..methods.base import LayerActivations
from ..methods.rope import RopeInverse, find_rope, layer_rope
from ..runtime import attention
from ..runtime.layers import cache_layout, native_caches


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


class RopeRecorder:
    """Stands in for a layer's rope module during capture: records what it rotates, so a
    layer whose attention never reaches the dispatcher still gives its post-RoPE queries."""

    def __init__(self, rope: Any):
        self.rope = rope
        self.outputs: list[mx.array] = []

    def __call__(self, x, *args, **kwargs):
        y = self.rope(x, *args, **kwargs)
        self.outputs.append(y)
        return y

    def queries(self, keys: mx.array) -> Optional[mx.array]:
        """The one rotated array that is not the keys the cache received, or None if the
        rope's calls do not single it out (a model that reshapes or splits after rotating)."""
        others = [y for y in self.outputs if y is not keys]
        if len(others) != 1 or others[0].shape[-1] != keys.shape[-1] or others[0].shape[1] % keys.shape[1]:
            return None
        return others[0]


def record_ropes(model, layers: list[int]) -> dict[int, tuple[Any, str, RopeRecorder]]:
    """Put a RopeRecorder in place of each listed layer's rope module -> {layer: (owning
    module, attribute, recorder)}; ``restore_ropes`` puts the modules back."""
    recorders = {}
    for i in layers:
        found = find_rope(model.layers[i])
        if found is not None:
            owner, name = found
            recorders[i] = (owner, name, RopeRecorder(getattr(owner, name)))
            setattr(owner, name, recorders[i][2])
    return recorders


def restore_ropes(recorders: dict[int, tuple[Any, str, RopeRecorder]]) -> None:
    for attn, name, recorder in recorders.values():
        setattr(attn, name, recorder.rope)


def check_finite(layer: int, sequence: int, parts: tuple[tuple[str, np.ndarray], ...]) -> None:
    """NaN/Inf in what a layer captured (after the float16 cast, which overflows past 65504)
    would poison every statistic fitted from it: stop at the first sequence that has one."""
    bad = [{"pre": "pre-RoPE keys"}.get(name, name) for name, x in parts if not np.isfinite(x).all()]
    if bad:
        raise ValueError(f"layer {layer}: NaN/Inf in captured {', '.join(bad)} (calibration sequence {sequence}); "
                         "the model's activations are not finite there, so velox cannot calibrate on them")


def capture(model, sequences: np.ndarray, progress: bool = True) -> list[LayerActivations | None]:
    """Run ``sequences [n_seq, L]`` through the model; one LayerActivations per layer.

    Layers that are not plain KVCache layers get ``None``. Arrays are float16 to
    keep memory bounded (8192 tokens of SmolLM2: ~0.5 GB). A layer whose queries could
    not be recorded (its attention neither reaches the dispatcher nor rotates them with its
    rope module) gets ``queries=None``: the methods that calibrate on queries refuse it.
    """
    layout = cache_layout(model)
    coded = [i for i, c in enumerate(layout.coded) if c]
    n_seq, L = sequences.shape
    store = {i: dict(keys=[], pre=[], values=[], queries=[]) for i in coded}
    # built before any rope module is swapped for a recorder
    # keys of another head_dim than the values (MLA's latents) are not what the rope rotates:
    # no pre-RoPE frame for them (the methods that need one refuse such layers)
    same = layout.head_dim == layout.value_head_dim
    unrope = {i: RopeInverse(layer_rope(model, i) if same else None, layout.head_dim).unrope for i in coded}
    recorders = record_ropes(model, [i for i in coded if not layout.attends_from_cache[i]])
    try:
        with attention.installed():
            for s in tqdm(range(n_seq), desc="capture", disable=not progress):
                caches = native_caches(model)
                for i in coded:
                    caches[i] = CaptureCache()
                for _, _, r in recorders.values():
                    r.outputs.clear()
                model(mx.array(sequences[s : s + 1]), cache=caches)
                recorded = {}
                for i in coded:
                    c = caches[i]
                    if layout.attends_from_cache[i]:
                        q = c.queries[0]
                    else:
                        q = recorders[i][2].queries(c.keys[0]) if i in recorders else None
                    k = c.keys[0].astype(mx.float32)
                    recorded[i] = (k, unrope[i](k, 0), c.values[0]) + ((q,) if q is not None else ())
                mx.eval(recorded)
                for i, arrays in recorded.items():
                    # [1, H, L, D] -> [L, H, D] float16
                    parts = tuple(zip(("keys", "pre", "values", "queries"),
                                      (np.array(x[0].astype(mx.float32)).transpose(1, 0, 2).astype(np.float16)
                                       for x in arrays)))
                    check_finite(i, s, parts)
                    for name, x in parts:
                        store[i][name].append(x)
    finally:
        restore_ropes(recorders)
    positions = np.tile(np.arange(L), n_seq)
    out: list[LayerActivations | None] = [None] * len(layout.native)
    for i in coded:
        st = store.pop(i)  # free each layer's pieces as soon as they are joined
        join = lambda name: np.concatenate(st.pop(name)) if st[name] else None
        out[i] = LayerActivations(keys=join("keys"), keys_pre_rope=join("pre"), values=join("values"),
                                  queries=join("queries"), positions=positions)
    return out
