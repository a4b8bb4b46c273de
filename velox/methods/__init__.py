"""Quantization methods, one module each: calibration, codecs, defaults.

Every method module provides ``calibrate(acts, spec, **options) -> {name: array}``
(options: method-specific calibration keywords, recorded in kv_quant),
``make_codecs(tensors, spec) -> (key_codec, value_codec)``, ``DEFAULT_KEY_BITS``,
``DEFAULT_VALUE_BITS``, ``SUPPORTED_KEY_BITS``, ``SUPPORTED_VALUE_BITS`` and, if it
calibrates, ``TENSORS`` (the names ``calibrate`` returns and ``make_codecs`` reads; the
loader refuses an artifact holding others). ``make_codecs`` reads every tensor through
``base.tensor``, which checks its shape, dtype kind and finiteness. A codec has
``encode(x [B, H, L, D], offset) -> parts`` and ``decode(*parts, offset) -> x̂``.
Shared pieces: ``scalar`` (rotated scalar codes, bit packing), ``vq`` (k-means,
nearest codeword), ``rotation``, ``rope`` (exact RoPE inverse, pre-RoPE coding).
"""

from types import ModuleType

from . import commvq, polar, qjl, rabitq, spectral, turboquant_mse, turboquant_prod, turboquant_rvq, vecinfer
from .base import LayerActivations, LayerSpec

METHODS: dict[str, ModuleType] = {
    "commvq": commvq,
    "polar": polar,
    "qjl": qjl,
    "rabitq": rabitq,
    "spectral": spectral,
    "turboquant_mse": turboquant_mse,
    "turboquant_prod": turboquant_prod,
    "turboquant_rvq": turboquant_rvq,
    "vecinfer": vecinfer,
}


def get_method(name: str) -> ModuleType:
    """The module implementing ``name``; a clear error lists what exists."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown KV method {name!r}; available: {', '.join(sorted(METHODS))}"
        ) from None


__all__ = ["METHODS", "get_method", "parse_method_options", "LayerActivations", "LayerSpec"]


def parse_method_options(item: str) -> tuple[str, dict]:
    """'spectral[basis=pairs]' -> ('spectral', {'basis': 'pairs'}): a method name with options of
    its ``calibrate`` (``;``-separated, numbers as ints), as the benchmark scripts take them."""
    name, _, rest = item.partition("[")
    options = {}
    for kv in filter(None, rest.rstrip("]").split(";")):
        k, _, v = kv.partition("=")
        options[k] = int(v) if v.lstrip("-").isdigit() else v
    return name, options
