"""Which layers velox codes, and whether their attention can read the codes.

Read off the model itself with a short forward pass (2 prefill tokens, then 1 decode step)
through probe caches, not from a list of architectures:

- a layer is **coded** when its own cache (``model.make_cache()``) is a plain ``KVCache``;
  sliding-window, linear-attention and other caches stay native;
- a coded layer **attends from its cache** when every attention call of the pass reaches
  velox's dispatcher (mlx_lm's ``scaled_dot_product_attention``) with exactly the keys and
  values its cache returned. Only such layers may take the fast path (``attend`` computes
  attention from the codes, ``update_and_fetch`` returns the new tokens only). Layers that
  compute attention themselves (gemma2's soft-capped scores, olmo's matmuls, direct
  ``mx.fast.scaled_dot_product_attention`` calls) or attend to something derived from the
  cache (MLA's latent caches) get caches that return the whole decoded history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from . import attention

PROBE_TOKENS = ((0, 1), (2,))  # a prefill of two tokens, then one decode step


class UnsupportedArchitecture(ValueError):
    """A model type velox cannot compress; the message names it and says why."""


def model_type_of(model) -> str:
    """The model's ``model_type`` (mlx_lm models keep it; else their module's name)."""
    name = getattr(model, "model_type", None)
    if not isinstance(name, str):
        args = getattr(model, "args", None)
        name = getattr(args, "model_type", None)
    return name if isinstance(name, str) else type(model).__module__.rsplit(".", 1)[-1]


def refuse(model, reason: str) -> UnsupportedArchitecture:
    """The error for ``model``'s type and ``reason``."""
    return UnsupportedArchitecture(f"velox cannot compress model type {model_type_of(model)!r}: {reason} "
                                   "(docs/ARCHITECTURES.md lists what velox supports)")


class ProbeCache(KVCache):
    """A plain KVCache that records how its layer's attention uses it."""

    def __init__(self):
        super().__init__()
        self.returned: tuple[mx.array, mx.array] | None = None
        self.updates = 0
        self.direct = 0  # attention calls that reached the dispatcher with the cache's own arrays
        self.shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def update_and_fetch(self, keys, values):
        self.updates += 1
        self.shapes = (tuple(keys.shape), tuple(values.shape))
        self.returned = super().update_and_fetch(keys, values)
        return self.returned

    def attend(self, queries, keys, values, scale, mask, sinks=None):
        if self.returned is not None and keys is self.returned[0] and values is self.returned[1]:
            self.direct += 1
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask, sinks=sinks)


@dataclass
class CacheLayout:
    """How a model's layers use their caches.

    native: per layer, None where the cache is a plain KVCache (velox codes it), else the
    native cache's class name. attends_from_cache: per layer, True where the fast path may
    serve it (see the module docstring). num_kv_heads / head_dim / value_head_dim: of the
    coded layers (value_head_dim differs from head_dim in MLA's latent caches, whose
    "keys" are the latent and "values" the rotated key part, and in models whose
    queries/keys are wider than their values).
    """

    native: list[Optional[str]]
    attends_from_cache: list[bool]
    num_kv_heads: int
    head_dim: int
    value_head_dim: int

    @property
    def coded(self) -> list[bool]:
        """Per layer: whether velox codes its cache."""
        return [n is None for n in self.native]


def own_make_cache(model) -> Optional[Callable[[], list]]:
    """The model's own cache factory (None: one KVCache a layer), also after ``velox.load``
    replaced ``model.make_cache`` (it keeps the model's as ``_velox_native_make_cache``)."""
    if hasattr(model, "_velox_native_make_cache"):
        return model._velox_native_make_cache
    return getattr(model, "make_cache", None)


def native_caches(model) -> list[Any]:
    """Fresh caches of the model's own kinds (what mlx_lm's ``make_prompt_cache`` gives)."""
    make = own_make_cache(model)
    return make() if make else [KVCache() for _ in model.layers]


def cache_layout(model) -> CacheLayout:
    """Probe ``model`` (lazily loaded is fine: shapes only, nothing is evaluated) -> CacheLayout.

    Raises UnsupportedArchitecture where no layer has a plain KVCache, where the caches are not
    one per layer, or where coded layers differ in shape or hold keys and values of different
    head counts.
    """
    caches = native_caches(model)
    if len(caches) != len(model.layers):
        # velox finds a coded layer's rope module at model.layers[i] for cache i
        raise refuse(model, f"it makes {len(caches)} caches for its {len(model.layers)} layers (layers that share "
                            "or skip a KV cache), and velox pairs cache i with layer i")
    native = [None if type(c) is KVCache else type(c).__name__ for c in caches]
    if all(n is not None for n in native):
        raise refuse(model, f"it has no attention layer with a plain KVCache for velox to code (its layers use "
                            f"{', '.join(sorted(set(native)))})")
    probes = [ProbeCache() if n is None else c for n, c in zip(native, caches)]
    with attention.installed():
        for ids in PROBE_TOKENS:
            model(mx.array([ids]), cache=probes)
    coded = [p for p in probes if isinstance(p, ProbeCache)]
    if any(p.shapes is None for p in coded):
        raise refuse(model, "a layer's plain KVCache received nothing in a forward pass (its layers do not "
                            "use one cache each)")
    shapes = {(p.shapes[0][1], p.shapes[0][3], p.shapes[1][1], p.shapes[1][3]) for p in coded}
    if len(shapes) > 1:
        raise refuse(model, f"its attention layers cache {len(shapes)} different shapes (KV heads × head_dim), "
                            "and velox codes models whose coded layers share one")
    h, dk, hv, dv = shapes.pop()
    if h != hv or not dk or not dv:
        raise refuse(model, f"its attention caches keys of {h}×{dk} and values of {hv}×{dv} (heads × dims), and "
                            "velox codes keys and values with as many heads, each of some dims")
    # attention from the codes takes keys and values of one head_dim
    fast = [isinstance(p, ProbeCache) and p.direct == p.updates and dk == dv for p in probes]
    return CacheLayout(native=native, attends_from_cache=fast, num_kv_heads=int(h), head_dim=int(dk),
                       value_head_dim=int(dv))
