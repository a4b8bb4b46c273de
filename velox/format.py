"""The ``kv_quant`` section of config.json (format v1): constants and validation.

Folders come from strangers on the Hub, so everything read from one is checked
here before use and every problem raises ``VeloxFormatError`` naming the field.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
ARTIFACT_FILE = "kv_quant.safetensors"
MAX_BITS = 8
MAX_FP16_TOKENS = 4096  # sink or window tokens a cache may keep in fp16


class VeloxFormatError(ValueError):
    """A model folder's kv_quant section or artifact is missing, corrupt or inconsistent."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise VeloxFormatError(f"kv_quant: {msg}")


def validate_kv_quant(kvq: Any, num_layers: int, known_methods: set[str]) -> dict:
    """Check a kv_quant section against the model; returns it unchanged.

    num_layers: the model's transformer layer count. Raises VeloxFormatError.
    """
    _require(isinstance(kvq, dict), "must be a JSON object")
    version = kvq.get("format_version")
    _require(isinstance(version, int), "format_version must be an integer")
    _require(version <= FORMAT_VERSION,
             f"format_version {version} is newer than this velox supports ({FORMAT_VERSION}); upgrade velox")
    model = kvq.get("model")
    _require(isinstance(model, dict) and all(isinstance(model.get(k), int) and model[k] > 0
                                             for k in ("num_kv_heads", "head_dim")),
             "model must give positive integers num_kv_heads and head_dim")
    _require(model.get("num_layers", num_layers) == num_layers,
             f"model.num_layers is {model.get('num_layers')} but the model has {num_layers} layers")
    methods = kvq.get("methods")
    _require(isinstance(methods, dict) and methods, "methods must be a non-empty object")
    default = kvq.get("default_method")
    _require(default in methods, f"default_method {default!r} is not one of methods {sorted(methods)}")
    for name, entry in methods.items():
        _require(name in known_methods,
                 f"unknown method {name!r} (this velox knows {', '.join(sorted(known_methods))})")
        _require(isinstance(entry, dict), f"methods.{name} must be an object")
        for key in ("sink", "window"):
            n = entry.get(key, 0)
            _require(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_FP16_TOKENS,
                     f"methods.{name}.{key} must be an integer in 0..{MAX_FP16_TOKENS}, got {n!r}")
        layers = entry.get("layers")
        _require(isinstance(layers, list) and len(layers) == num_layers,
                 f"methods.{name}.layers must list all {num_layers} layers of the model "
                 f"(found {len(layers) if isinstance(layers, list) else type(layers).__name__})")
        for i, layer in enumerate(layers):
            where = f"methods.{name}.layers[{i}]"
            _require(isinstance(layer, dict) and layer.get("layer") == i, f"{where} must be an object with layer={i}")
            if layer.get("cache") == "native":
                continue
            for key in ("key_bits", "value_bits"):
                b = layer.get(key)
                ok = lambda x: isinstance(x, int) and not isinstance(x, bool) and 0 < x <= MAX_BITS
                per_head = isinstance(b, list) and len(b) == model["num_kv_heads"] and all(map(ok, b))
                _require(ok(b) or per_head, f"{where}.{key} must be an integer in 1..{MAX_BITS} or a list of "
                                            f"{model['num_kv_heads']} such integers (one per KV head), got {b!r}")
            _require(isinstance(layer["key_bits"], list) == isinstance(layer["value_bits"], list),
                     f"{where}: key_bits and value_bits must both be integers or both per-head lists")
    quality = kvq.get("quality")
    if quality is not None:
        _require(isinstance(quality, dict) and isinstance(quality.get("runs"), dict),
                 "quality must be an object with a runs object (written by velox-eval)")
        for name, run in quality["runs"].items():
            _require(isinstance(run, dict) and all(isinstance(run.get(k), (int, float)) and not isinstance(run.get(k), bool)
                                                   for k in ("ppl", "delta_ppl", "bytes_per_token")),
                     f"quality.runs.{name} needs numeric ppl, delta_ppl and bytes_per_token")
    artifacts = kvq.get("artifacts")
    _require(isinstance(artifacts, list), "artifacts must be a list")
    for i, art in enumerate(artifacts):
        _require(isinstance(art, dict) and art.get("file") == ARTIFACT_FILE
                 and isinstance(art.get("sha256"), str),
                 f"artifacts[{i}] must be {{file: {ARTIFACT_FILE!r}, sha256: hex}}")
    return kvq


def check_artifacts(folder: Path, kvq: dict) -> None:
    """Every listed artifact exists in ``folder`` with the recorded sha256."""
    for art in kvq["artifacts"]:
        path = Path(folder) / art["file"]
        if not path.is_file():
            raise VeloxFormatError(f"kv_quant artifact missing: {path}")
        digest = sha256_file(path)
        if digest != art["sha256"]:
            raise VeloxFormatError(
                f"kv_quant artifact {art['file']} sha256 mismatch: config says {art['sha256'][:12]}…, "
                f"file has {digest[:12]}…"
            )
