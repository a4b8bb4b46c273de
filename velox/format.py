"""The ``kv_quant`` section of config.json (format v1): constants and validation.

Folders come from strangers on the Hub, so everything read from one is checked
here before use and every problem raises ``VeloxFormatError`` naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
ARTIFACT_FILE = "kv_quant.safetensors"
MAX_BITS = 8
MAX_FP16_TOKENS = 4096  # sink or window tokens a cache may keep in fp16
# Bounds on declared sizes: a folder claiming more is corrupt or hostile, and would
# otherwise make the loader allocate that much before anything else could fail.
MAX_KV_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_SEED = 2**32 - 1
MAX_HEADER_BYTES = 16 << 20  # safetensors JSON header; velox's are a few KiB
# safetensors dtypes MLX loads on every backend, with their item sizes.
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
                      "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8}


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


def _is_int(x: Any, lo: int, hi: int) -> bool:
    """An integer (not a bool: JSON true is not a count) in lo..hi."""
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def validate_kv_quant(kvq: Any, num_layers: int, known_methods: set[str]) -> dict:
    """Check a kv_quant section against the model; returns it unchanged.

    num_layers: the model's transformer layer count. Raises VeloxFormatError.
    """
    _require(isinstance(kvq, dict), "must be a JSON object")
    version = kvq.get("format_version")
    _require(isinstance(version, int) and not isinstance(version, bool) and version >= 1,
             "format_version must be an integer")
    _require(version <= FORMAT_VERSION,
             f"format_version {version} is newer than this velox supports ({FORMAT_VERSION}); upgrade velox")
    model = kvq.get("model")
    _require(isinstance(model, dict) and _is_int(model.get("num_kv_heads"), 1, MAX_KV_HEADS)
             and _is_int(model.get("head_dim"), 2, MAX_HEAD_DIM) and model["head_dim"] % 2 == 0,
             f"model must give positive integers num_kv_heads and head_dim (num_kv_heads at most "
             f"{MAX_KV_HEADS}, head_dim even and at most {MAX_HEAD_DIM}), got {model!r}")
    _require("value_head_dim" not in model or (_is_int(model["value_head_dim"], 2, MAX_HEAD_DIM)
                                               and model["value_head_dim"] % 2 == 0),
             f"model.value_head_dim, where given, must be an even integer in 2..{MAX_HEAD_DIM}, got {model!r}")
    _require(model.get("num_layers", num_layers) == num_layers,
             f"model.num_layers is {model.get('num_layers')} but the model has {num_layers} layers")
    calibration = kvq.get("calibration", {})
    _require(isinstance(calibration, dict) and _is_int(calibration.get("seed", 0), 0, MAX_SEED),
             f"calibration must be an object whose seed is an integer in 0..{MAX_SEED}")
    methods = kvq.get("methods")
    _require(isinstance(methods, dict) and methods, "methods must be a non-empty object")
    default = kvq.get("default_method")
    _require(isinstance(default, str) and default in methods, f"default_method {default!r} is not one of methods {sorted(methods)}")
    for name, entry in methods.items():
        _require(name in known_methods,
                 f"unknown method {name!r} (this velox knows {', '.join(sorted(known_methods))})")
        _require(isinstance(entry, dict), f"methods.{name} must be an object")
        for key in ("sink", "window"):
            n = entry.get(key, 0)
            _require(_is_int(n, 0, MAX_FP16_TOKENS),
                     f"methods.{name}.{key} must be an integer in 0..{MAX_FP16_TOKENS}, got {n!r}")
        options = entry.get("options", {})
        _require(isinstance(options, dict) and _is_int(options.get("outliers", 0), 0, model["head_dim"]),
                 f"methods.{name}.options must be an object whose outliers is an integer in "
                 f"0..{model['head_dim']}, got {options!r}")
        layers = entry.get("layers")
        _require(isinstance(layers, list) and len(layers) == num_layers,
                 f"methods.{name}.layers must list all {num_layers} layers of the model "
                 f"(found {len(layers) if isinstance(layers, list) else type(layers).__name__})")
        for i, layer in enumerate(layers):
            where = f"methods.{name}.layers[{i}]"
            _require(isinstance(layer, dict) and _is_int(layer.get("layer"), i, i),
                     f"{where} must be an object with layer={i}")
            if layer.get("cache") == "native":
                continue
            for key in ("key_bits", "value_bits"):
                b = layer.get(key)
                ok = lambda x: _is_int(x, 1, MAX_BITS)
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
    # Exactly one entry: the loader reads kv_quant.safetensors whenever it exists, so an
    # empty list would skip its sha256 check.
    _require(isinstance(artifacts, list) and len(artifacts) == 1, f"artifacts must list {ARTIFACT_FILE} once")
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


def read_safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Check a safetensors file's structure before any loader parses it -> {name: (dtype, shape)}.

    The format is an 8-byte little-endian header length, a JSON header
    ``{name: {dtype, shape, data_offsets: [begin, end]}}`` and the data. MLX's own reader
    trusts the header (a hostile length or offset can crash the process), so every
    length, offset and size is checked against the file here first.
    """
    path = Path(path)
    size = path.stat().st_size

    def fail(msg: str) -> None:
        raise VeloxFormatError(f"{path.name}: {msg}")

    if size < 8:
        fail(f"{size} bytes is too short for a safetensors file")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(MAX_HEADER_BYTES, size - 8):
            fail(f"header length {n} exceeds the file ({size} bytes) or {MAX_HEADER_BYTES} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"header is not valid JSON: {e}")
    if not isinstance(header, dict):
        fail("header must be a JSON object")
    data_bytes = size - 8 - n
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            if not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                fail("__metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict):
            fail(f"tensor {name!r}: entry must be an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            fail(f"tensor {name!r}: dtype {dtype!r} is not one of {', '.join(SAFETENSORS_DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_int(d, 0, data_bytes) for d in shape)):
            fail(f"tensor {name!r}: shape {shape!r} must be a list of at most 8 sizes that fit the file")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o, 0, data_bytes) for o in offsets)
                and offsets[0] <= offsets[1]):
            fail(f"tensor {name!r}: data_offsets {offsets!r} must be [begin, end] within the {data_bytes} data bytes")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            fail(f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes, data_offsets give "
                 f"{offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
        out[name] = (dtype, shape)
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            fail(f"tensors {a!r} and {b!r} overlap")
    return out
