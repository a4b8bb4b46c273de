"""Hostile or corrupt folders: every mutation of kv_quant or its artifact either loads and
generates, or raises velox's VeloxFormatError (a ValueError) with a message; never a crash
inside MLX, a hang, or a silent load of something wrong.

The artifact's sha256 in kv_quant is recomputed after each mutation, as an uploader who
controls both files would, so the checks behind the checksum are what is exercised.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import struct
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from velox.convert.cli import main as convert_main
from velox.cpu import float32_on_cpu
from velox.format import ARTIFACT_FILE, VeloxFormatError, sha256_file, validate_kv_quant
from velox.methods import METHODS
from velox.runtime.loader import install_kv_caches

METHOD_LIST = ["spectral", "turboquant_mse", "vecinfer", "rabitq"]
CALIB = ["--calib-tokens", "256", "--calib-seq-len", "64", "--rabitq-nlist", "8", "--quiet"]
MAX_CASE_SECONDS = 20  # a case slower than this counts as a hang
EXAMPLES = {"config": 300, "artifact": 500}
RUNS: dict[str, int] = {}  # "what:outcome" counts, printed by test_report_counts for docs/RELIABILITY.md
SETTINGS = settings(max_examples=1, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def converted(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "tiny-kv"
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--kv", ",".join(METHOD_LIST),
                         *CALIB]) == 0
    return out


@pytest.fixture(scope="module")
def loaded(converted):
    """The model and tokenizer loaded once; each case re-installs caches from a mutated folder."""
    model, tok = mlx_lm.load(str(converted))
    float32_on_cpu(model)
    kvq = json.loads((converted / "config.json").read_text())["kv_quant"]
    return model, tok, kvq, converted


def try_load(model, tok, kvq, folder: Path, method: str | None, what: str = "valid") -> str:
    """What velox.load does after mlx_lm.load, then 2 generated tokens -> 'loaded' or 'refused'."""
    start = time.perf_counter()
    try:
        validate_kv_quant(kvq, len(model.layers), set(METHODS))
        install_kv_caches(model, folder, kvq, method)
    except ValueError as e:  # VeloxFormatError, or 'was not calibrated' for a deleted method
        assert str(e), "an error needs a message"
        outcome = "refused"
    else:
        cache = mlx_lm.models.cache.make_prompt_cache(model)
        mlx_lm.generate(model, tok, prompt="Hi", max_tokens=2, prompt_cache=cache)
        assert cache[0].offset > 0
        outcome = "loaded"
    assert time.perf_counter() - start < MAX_CASE_SECONDS
    RUNS[f"{what}:{outcome}"] = RUNS.get(f"{what}:{outcome}", 0) + 1
    return outcome


def case_folder(src: Path, dst: Path, data: bytes | None = None) -> Path:
    """A folder holding only what install_kv_caches reads: the (mutated) artifact."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    if data is None:
        shutil.copy(src / ARTIFACT_FILE, dst / ARTIFACT_FILE)
    else:
        (dst / ARTIFACT_FILE).write_bytes(data)
    return dst


def resign(kvq: dict, folder: Path) -> dict:
    """kv_quant with the artifact's sha256 updated to the mutated file."""
    kvq = copy.deepcopy(kvq)
    if isinstance(kvq.get("artifacts"), list) and kvq["artifacts"] and isinstance(kvq["artifacts"][0], dict):
        kvq["artifacts"][0]["sha256"] = sha256_file(folder / ARTIFACT_FILE)
    return kvq


# ---------------------------------------------------------------- config mutations

def paths(node, prefix=()) -> list[tuple]:
    """Every key path in a JSON tree (dict keys and list indices), parents before children."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, prefix + (i,))
    return out


SPECIAL_INTS = [0, 1, -1, 2, 3, 4, 7, 8, 9, 31, 32, 63, 64, 65, 128, 4096, 4097, 10**6, 2**31, 2**63, -2**63]
json_scalars = st.one_of(st.none(), st.booleans(), st.sampled_from(SPECIAL_INTS), st.integers(),
                         st.floats(), st.text(max_size=8), st.sampled_from(METHOD_LIST + ["native", "evil"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(["layer", "key_bits", "value_bits", "cache", "x"]),
                                             inner, max_size=3), max_leaves=6)


@st.composite
def config_mutation(draw, kvq: dict) -> dict:
    """kv_quant with one to three random edits: replace a value, delete a key or element,
    duplicate a list element."""
    kvq = copy.deepcopy(kvq)
    for _ in range(draw(st.integers(1, 3))):
        all_paths = paths(kvq)
        if not all_paths:
            break
        path = draw(st.sampled_from(all_paths))
        parent = kvq
        for key in path[:-1]:
            parent = parent[key]
        op = draw(st.sampled_from(["set", "set", "set", "delete", "duplicate"]))
        if op == "set":
            parent[path[-1]] = draw(json_values)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, list):
            parent.insert(path[-1], copy.deepcopy(parent[path[-1]]))
    return kvq


@settings(SETTINGS, max_examples=EXAMPLES["config"])
@given(data=st.data())
def test_fuzz_kv_quant_section(loaded, tmp_path_factory, data):
    model, tok, kvq, folder = loaded
    mutated = data.draw(config_mutation(kvq))
    method = data.draw(st.sampled_from([None] + METHOD_LIST))
    # no resign: config edits are about the section itself; the artifact is untouched
    try_load(model, tok, mutated, folder, method, what="config")


# ---------------------------------------------------------------- artifact mutations

def split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


# Edits that leave no valid artifact whichever method is loaded.
ALWAYS_INVALID = {"truncate", "offsets", "length", "nonfinite", "drop", "extra"}
DTYPES = ["F32", "F16", "BF16", "I32", "U32", "I8", "U8", "BOOL", "I64", "F64", "X"]


@st.composite
def artifact_mutation(draw, raw: bytes) -> tuple[str, str, bytes]:
    """The artifact's bytes after one hostile edit: truncation, a header field (dtype, shape,
    offsets, length), NaN/Inf written into a float tensor, or a re-saved tensor set with a
    tensor dropped, added, re-typed or re-shaped -> (kind, tensor name, bytes)."""
    header, _ = split(raw)
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    kind = draw(st.sampled_from(["truncate", "dtype", "shape", "offsets", "length", "nonfinite",
                                 "drop", "extra", "retype", "reshape", "garble"]))
    return kind, name, draw(_mutate(raw, kind, name))


@st.composite
def _mutate(draw, raw: bytes, kind: str, name: str) -> bytes:
    header, body = split(raw)
    names = sorted(k for k in header if k != "__metadata__")
    info = header[name]
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if kind == "dtype":
        info["dtype"] = draw(st.sampled_from(DTYPES))
    elif kind == "shape":
        info["shape"] = draw(st.lists(st.sampled_from([0, 1, 2, 3, 8, 64, 2**31, 2**62]), max_size=5))
    elif kind == "offsets":
        info["data_offsets"] = draw(st.lists(st.sampled_from([0, 1, 7, len(body), len(body) + 1, 2**62, -1]),
                                             min_size=0, max_size=3))
    elif kind == "length":
        n = draw(st.sampled_from([0, 1, len(raw), 2**32, 2**63, 2**64 - 1]))
        return struct.pack("<Q", n) + raw[8:]
    elif kind == "garble":
        pos = draw(st.integers(8, 8 + struct.unpack("<Q", raw[:8])[0] - 1))
        return raw[:pos] + bytes([draw(st.integers(0, 255))]) + raw[pos + 1:]
    elif kind == "nonfinite":
        floats = [k for k in names if header[k]["dtype"] == "F32" and math.prod(header[k]["shape"])]
        info = header[name if name in floats else draw(st.sampled_from(floats))]
        begin, end = info["data_offsets"]
        i = draw(st.integers(0, (end - begin) // 4 - 1))
        value = struct.pack("<f", draw(st.sampled_from([math.nan, math.inf, -math.inf])))
        body = body[:begin + 4 * i] + value + body[begin + 4 * i + 4:]
    else:
        tensors = {k: np.array(v) for k, v in _load_bytes(raw).items()}
        if kind == "drop":
            del tensors[name]
        elif kind == "extra":
            extra = draw(st.sampled_from(["spectral.layers.0.keys.junk", "evil.layers.0.keys.basis",
                                          "spectral.layers.9.keys.basis", "turboquant_mse.layers.0.keys.scale"]))
            tensors[extra] = np.zeros((2, 64), np.float32)
        elif kind == "retype":
            dtype = draw(st.sampled_from([np.int32, np.uint8, np.float16, np.int64, np.bool_]))
            tensors[name] = tensors[name].astype(dtype)
        else:
            a = tensors[name]
            tensors[name] = draw(st.sampled_from([a.reshape(-1), a[..., :1], a[:1], a[None], np.zeros((0,), a.dtype)]))
        return _save_bytes(tensors)
    return join(header, body)


def _load_bytes(raw: bytes) -> dict:
    from safetensors.numpy import load

    return load(raw)


def _save_bytes(tensors: dict) -> bytes:
    from safetensors.numpy import save

    return save(tensors)


@settings(SETTINGS, max_examples=EXAMPLES["artifact"])
@given(data=st.data())
def test_fuzz_artifact(loaded, tmp_path_factory, data):
    model, tok, kvq, folder = loaded
    raw = (folder / ARTIFACT_FILE).read_bytes()
    kind, name, mutated = data.draw(artifact_mutation(raw))
    case = case_folder(folder, tmp_path_factory.getbasetemp() / "fuzz-case", mutated)
    # Mostly the method whose tensor was edited: its codecs are what must notice.
    owner = name.split(".")[0]
    method = data.draw(st.sampled_from([owner, owner, owner, *METHOD_LIST]))
    outcome = try_load(model, tok, resign(kvq, case), case, method, what=f"artifact.{kind}")
    if kind in ALWAYS_INVALID:
        assert outcome == "refused", f"{kind} on {name} loaded with {method}"


# ---------------------------------------------------------------- targeted cases

def edit_tensors(folder: Path, dst: Path, fn) -> Path:
    tensors = {k: np.array(v) for k, v in _load_bytes((folder / ARTIFACT_FILE).read_bytes()).items()}
    fn(tensors)
    return case_folder(folder, dst, _save_bytes(tensors))


@pytest.mark.parametrize("method,edit,message", [
    ("rabitq", lambda t: t.update({"rabitq.layers.0.keys.centroids":
                                   t["rabitq.layers.0.keys.centroids"].astype(np.int32)}),
     "'keys.centroids' is int32, expected a floating-point dtype"),
    ("spectral", lambda t: t.update({"spectral.layers.1.keys.bits": t["spectral.layers.1.keys.bits"].astype(np.float32)}),
     "'keys.bits' is float32, expected an integer dtype"),
    ("spectral", lambda t: t["spectral.layers.0.keys.bits"].__setitem__((0, 0), 99), "'keys.bits' has values outside 0..8"),
    ("vecinfer", lambda t: t["vecinfer.layers.1.keys.codebooks"].__setitem__((0, 0, 0, 0), np.nan),
     "'vecinfer.layers.1.keys.codebooks' holds NaN or Inf"),
    ("spectral", lambda t: t["spectral.layers.0.keys.levels"].__setitem__((1, 2, 0), np.inf),
     "'spectral.layers.0.keys.levels' holds NaN or Inf"),
    ("spectral", lambda t: t.update({"spectral.layers.0.keys.extra": np.zeros(3, np.float32)}),
     "unexpected tensors .*spectral.layers.0.keys.extra"),
    ("spectral", lambda t: t.pop("vecinfer.layers.1.keys.smooth"), "missing tensors .*vecinfer.layers.1.keys.smooth"),
])
def test_bad_tensors_name_the_field(loaded, tmp_path, method, edit, message):
    model, tok, kvq, folder = loaded
    case = edit_tensors(folder, tmp_path / "case", edit)
    with pytest.raises(VeloxFormatError, match=message):
        install_kv_caches(model, case, resign(kvq, case), method)


def test_tensor_checks_kind_finiteness_and_bounds():
    from velox.methods.base import tensor

    t = {"f": mx.array([1.0, math.nan]), "i": mx.array([0, 9], dtype=mx.int64), "b": mx.array([True])}
    with pytest.raises(VeloxFormatError, match="'f' holds NaN or Inf"):
        tensor(t, "f", (2,), mx.float32)
    with pytest.raises(VeloxFormatError, match="'f' is float32, expected an integer dtype"):
        tensor(t, "f", (2,), mx.int32)
    with pytest.raises(VeloxFormatError, match="'b' is bool, expected a floating-point dtype"):
        tensor(t, "b", (1,), mx.float32)
    with pytest.raises(VeloxFormatError, match="'i' has values outside 0..8"):
        tensor(t, "i", (2,), mx.int32, bounds=(0, 8))
    assert tensor(t, "i", (None,), mx.int32, bounds=(0, 9)).dtype == mx.int32


def test_huge_header_length_is_refused_before_mlx(loaded, tmp_path):
    model, tok, kvq, folder = loaded
    raw = (folder / ARTIFACT_FILE).read_bytes()
    case = case_folder(folder, tmp_path / "case", struct.pack("<Q", 2**63) + raw[8:])
    with pytest.raises(VeloxFormatError, match="header length 9223372036854775808 exceeds the file"):
        install_kv_caches(model, case, resign(kvq, case), "spectral")
    header, body = split(raw)
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [2**31, 2**31]
    case = case_folder(folder, tmp_path / "case", join(header, body))
    with pytest.raises(VeloxFormatError, match="must be a list of at most 8 sizes that fit the file"):
        install_kv_caches(model, case, resign(kvq, case), "spectral")


@pytest.mark.parametrize("field,value,message", [
    ("head_dim", 32, "model gives num_kv_heads=2, head_dim=32 but layer 0 has 2 KV heads of 64"),
    ("num_kv_heads", 1, "model gives num_kv_heads=1, head_dim=64 but layer 0 has 2 KV heads of 64"),
    ("head_dim", 2**20, "head_dim even and at most 1024"),
])
def test_declared_sizes_must_match_the_model(loaded, field, value, message):
    model, tok, kvq, folder = loaded
    kvq = copy.deepcopy(kvq)
    kvq["model"][field] = value
    with pytest.raises(VeloxFormatError, match=message):
        validate_kv_quant(kvq, len(model.layers), set(METHODS))
        install_kv_caches(model, folder, kvq, "turboquant_mse")


def test_unmutated_folder_loads_every_method(loaded):
    model, tok, kvq, folder = loaded
    for m in METHOD_LIST:
        assert try_load(model, tok, kvq, folder, m) == "loaded"


def test_report_counts(capsys):
    """Printed for docs/RELIABILITY.md (run with -s to see it)."""
    with capsys.disabled():
        print(f"\nfuzz outcomes ({sum(RUNS.values())} cases):")
        for key in sorted(RUNS):
            print(f"  {key}: {RUNS[key]}")
