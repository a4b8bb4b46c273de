"""velox.load: an mlx_lm model whose caches are the folder's compressed KV caches."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS
from mlx_lm.utils import load as mlx_lm_load

from ..cpu import float32_on_cpu
from ..format import ARTIFACT_FILE, VeloxFormatError, check_artifacts, validate_kv_quant
from ..methods import METHODS, LayerSpec, get_method, outliers, ratequant
from ..methods.rope import layer_rope
from . import attention
from .cache import VeloxKVCache


def resolve_path(path_or_repo: str, revision: Optional[str] = None) -> Path:
    """A local folder as is; a Hub repo id downloaded with kv_quant.safetensors included."""
    path = Path(path_or_repo)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    patterns = DEFAULT_ALLOW_PATTERNS + [ARTIFACT_FILE, "README.md"]
    return Path(snapshot_download(str(path_or_repo), revision=revision, allow_patterns=patterns))


def read_kv_quant(folder: Path) -> dict:
    """The raw kv_quant section of ``folder/config.json`` (not yet validated)."""
    config_path = Path(folder) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise VeloxFormatError(f"no config.json in {folder}") from None
    except json.JSONDecodeError as e:
        raise VeloxFormatError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or "kv_quant" not in config:
        raise VeloxFormatError(f"{config_path} has no kv_quant section: convert the model with velox-convert first")
    return config["kv_quant"]


def layer_specs(kvq: dict, method: str, model) -> list[Optional[LayerSpec]]:
    """One LayerSpec per layer for ``method`` (None where the native cache stays); a layer
    with per-head widths gets key_bits/value_bits 0 (its entry holds the lists)."""
    model_info = kvq.get("model", {})
    seed = int(kvq.get("calibration", {}).get("seed", 0))
    specs = []
    for entry in kvq["methods"][method]["layers"]:
        if entry.get("cache") == "native":
            specs.append(None)
            continue
        uniform = not isinstance(entry["key_bits"], list)
        specs.append(LayerSpec(layer=entry["layer"], num_kv_heads=int(model_info["num_kv_heads"]),
                               head_dim=int(model_info["head_dim"]), key_bits=entry["key_bits"] if uniform else 0,
                               value_bits=entry["value_bits"] if uniform else 0, seed=seed,
                               rope=layer_rope(model, entry["layer"])))
    return specs


def build_codecs(kvq: dict, method: str, tensors: dict[str, mx.array], model) -> list[Optional[tuple]]:
    """(key codec, value codec) per layer, from the folder's artifact tensors."""
    module = get_method(method)
    n_outliers = kvq["methods"][method].get("options", {}).get("outliers", 0)
    codecs = []
    for spec, entry in zip(layer_specs(kvq, method, model), kvq["methods"][method]["layers"]):
        if spec is None:
            codecs.append(None)
            continue
        prefix = f"{method}.layers.{spec.layer}."
        mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            if n_outliers:
                try:
                    outliers.check(method, n_outliers, spec.head_dim)
                except ValueError as e:
                    raise VeloxFormatError(f"kv_quant options.outliers: {e}") from None
                inner = lambda d: module.make_codecs(mine, replace(spec, head_dim=d))[0]
                codecs.append((outliers.key_codec(mine, spec, n_outliers, inner), module.make_codecs(mine, spec)[1]))
            elif spec.key_bits:
                codecs.append(module.make_codecs(mine, spec))
            else:
                codecs.append(ratequant.make_mixed_codecs(module, mine, spec, entry["key_bits"], entry["value_bits"]))
        except KeyError as e:
            raise VeloxFormatError(f"{ARTIFACT_FILE}: missing tensor {prefix}{e.args[0]}") from None
        except VeloxFormatError as e:
            raise VeloxFormatError(f"{method} layer {spec.layer}: {e}") from None
    return codecs


def install_kv_caches(model, folder: Path, kvq: dict, method: Optional[str] = None, fast: bool = True) -> str:
    """Replace ``model.make_cache`` so plain KVCache layers get VeloxKVCache. Returns the method.

    fast: caches whose codecs allow it attend from their codes (``velox.kernels``); this
    installs the attention dispatcher that routes attention to them.
    """
    method = method or kvq["default_method"]
    if method not in kvq["methods"]:
        raise ValueError(f"method {method!r} was not calibrated into this folder; it has: "
                         f"{', '.join(kvq['methods'])}")
    check_artifacts(folder, kvq)
    path = Path(folder) / ARTIFACT_FILE
    tensors = mx.load(str(path)) if path.exists() else {}
    codecs = build_codecs(kvq, method, tensors, model)
    entry = kvq["methods"][method]
    fp16 = {"sink": int(entry.get("sink", 0)), "window": int(entry.get("window", 0))}
    attention.install()
    # Keep the model's own factory across repeated installs (another method, another folder).
    if not hasattr(model, "_velox_native_make_cache"):
        model._velox_native_make_cache = getattr(model, "make_cache", None)
    native_make_cache = model._velox_native_make_cache

    def make_cache() -> list[Any]:
        native = native_make_cache() if native_make_cache else [KVCache() for _ in model.layers]
        return [VeloxKVCache(*c, method=method, fast=fast, **fp16) if c is not None and type(n) is KVCache else n
                for c, n in zip(codecs, native)]

    model.make_cache = make_cache
    return method


def load(path_or_repo: str, kv: Optional[str] = None, revision: Optional[str] = None,
         fast: bool = True, **kwargs) -> tuple[Any, Any]:
    """Load a velox folder (or Hub repo) -> (model, tokenizer) with compressed KV caches.

    kv: which calibrated method to use (default: the folder's default_method).
    fast: attention from the codes where the method allows it (else decode the cache every step).
    Other keyword arguments go to ``mlx_lm.load``. On MLX's CPU backend the model
    computes in float32 (bf16 there is slow and visibly worse).
    """
    folder = resolve_path(path_or_repo, revision)
    kvq = read_kv_quant(folder)
    model, tokenizer = mlx_lm_load(str(folder), **kwargs)
    float32_on_cpu(model)
    validate_kv_quant(kvq, len(model.layers), set(METHODS))
    install_kv_caches(model, folder, kvq, kv, fast=fast)
    return model, tokenizer


def cache_bytes(cache: list[Any]) -> int:
    """Bytes held by a prompt cache's arrays."""
    return sum(c.nbytes for c in cache)
