"""One attention dispatch point in place of mlx_lm's ``scaled_dot_product_attention``.

Caches that define ``attend(queries, keys, values, scale=, mask=, sinks=)`` get to
compute attention themselves (capture records queries this way; compressed-domain
attention plugs in here); every other cache goes to mlx_lm's original function.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, Optional

import mlx.core as mx
from mlx_lm.models import base

_ORIGINAL = base.scaled_dot_product_attention


def dispatch_attention(queries, keys, values, cache, scale: float, mask: Optional[mx.array],
                       sinks: Optional[mx.array] = None) -> mx.array:
    """Same signature as mlx_lm's; queries [B, Hq, L, D] -> [B, Hq, L, D]."""
    if hasattr(cache, "attend"):
        return cache.attend(queries, keys, values, scale=scale, mask=mask, sinks=sinks)
    return _ORIGINAL(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)


def _model_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "mlx_lm.models.base" or name.startswith("mlx_lm.models."))]


def is_installed() -> bool:
    """Whether mlx_lm.models.base currently points at the dispatcher (model modules
    imported after ``install`` pick it up from there)."""
    return base.scaled_dot_product_attention is dispatch_attention


def install() -> None:
    """Point mlx_lm.models.base and every loaded model module at the dispatcher (idempotent)."""
    for module in _model_modules():
        if getattr(module, "scaled_dot_product_attention", None) is _ORIGINAL:
            module.scaled_dot_product_attention = dispatch_attention


def uninstall() -> None:
    """Restore mlx_lm's own function everywhere ``install`` replaced it."""
    for module in _model_modules():
        if getattr(module, "scaled_dot_product_attention", None) is dispatch_attention:
            module.scaled_dot_product_attention = _ORIGINAL


@contextmanager
def installed() -> Iterator[None]:
    """The dispatcher installed inside the block, then left as it was before (library code
    never removes a dispatcher it did not install: ``velox.load``'s fast path needs it)."""
    was = is_installed()
    install()
    try:
        yield
    finally:
        if not was:
            uninstall()
