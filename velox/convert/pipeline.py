"""velox-convert's pipeline: load → capture → calibrate every method → write the folder."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
from mlx_lm.utils import load as mlx_lm_load
from mlx_lm.utils import save_config, save_model
from tqdm import tqdm

from .. import __version__
from ..cpu import float32_on_cpu
from ..format import ARTIFACT_FILE, FORMAT_VERSION, MAX_SINK, sha256_file
from ..methods import LayerSpec, get_method
from ..methods.rope import layer_rope
from ..model_cards import render_card
from ..runtime.loader import resolve_path
from .calib_data import load_calibration
from .capture import capture


# Copied byte for byte: re-saving through transformers can change the tokenizer class.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def copy_tokenizer_files(src: Path, dst: Path, tokenizer) -> None:
    """Copy the source's tokenizer files as they are; save_pretrained if it has none."""
    found = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not any(f.name.startswith("tokenizer") for f in found):
        tokenizer.save_pretrained(str(dst))
    for f in found:
        shutil.copy(f, dst / f.name)


def parse_methods(kv: str | Sequence[str]) -> list[str]:
    """'spectral,turboquant_mse' -> ['spectral', 'turboquant_mse'], each checked to exist."""
    names = [m.strip() for m in kv.split(",")] if isinstance(kv, str) else list(kv)
    names = [m for m in names if m]
    if not names:
        raise ValueError("--kv needs at least one method")
    if len(set(names)) != len(names):
        raise ValueError(f"--kv lists a method twice: {','.join(names)}")
    for m in names:
        get_method(m)
    return names


def method_bits(name: str, key_bits: Optional[int], value_bits: Optional[int]) -> tuple[int, int]:
    """The method's defaults where not given; checked against what it supports."""
    module = get_method(name)
    kb = key_bits if key_bits is not None else module.DEFAULT_KEY_BITS
    vb = value_bits if value_bits is not None else module.DEFAULT_VALUE_BITS
    for what, b, allowed in (("key", kb, module.SUPPORTED_KEY_BITS), ("value", vb, module.SUPPORTED_VALUE_BITS)):
        if b not in allowed:
            raise ValueError(f"{name}: {what} bits {b} not supported (choose from {allowed})")
    return kb, vb


def calibrate_method(name: str, acts: list, model, key_bits: int, value_bits: int, seed: int,
                     options: Optional[dict] = None, progress: bool = True) -> tuple[dict, dict]:
    """Run one method's calibration on every layer -> (kv_quant method entry, tensors).

    options: keyword arguments of the method's ``calibrate`` (e.g. rabitq's nlist),
    recorded in the entry.
    """
    module = get_method(name)
    options = dict(options or {})
    _, num_kv_heads, head_dim = next(a for a in acts if a is not None).keys.shape
    layers, tensors, per_layer = [], {}, []
    start = time.perf_counter()
    for i, layer_acts in enumerate(tqdm(acts, desc=f"calibrate {name}", disable=not progress)):
        if layer_acts is None:
            layers.append({"layer": i, "cache": "native"})
            continue
        t0 = time.perf_counter()
        spec = LayerSpec(layer=i, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         key_bits=key_bits, value_bits=value_bits, seed=seed,
                         rope=layer_rope(model, i))
        fitted = module.calibrate(layer_acts, spec, **options)
        mx.eval(list(fitted.values()))  # so the time is this layer's
        tensors.update({f"{name}.layers.{i}.{k}": v for k, v in fitted.items()})
        per_layer.append(time.perf_counter() - t0)
        layers.append({"layer": i, "key_bits": key_bits, "value_bits": value_bits})
    entry = {"key_bits": key_bits, "value_bits": value_bits,
             "fit_seconds": round(time.perf_counter() - start, 2),
             "fit_seconds_per_layer_max": round(max(per_layer, default=0.0), 2), "layers": layers}
    if options:
        entry["options"] = options
    return entry, tensors


def convert(hf_path: str, mlx_path: str, kv: str | Sequence[str] = "spectral",
            key_bits: Optional[int] = None, value_bits: Optional[int] = None,
            calib_data: Optional[str] = None, calib_tokens: int = 8192, calib_seq_len: int = 512,
            seed: int = 0, force: bool = False, progress: bool = True,
            method_options: Optional[dict[str, dict]] = None, sink: int = 0) -> dict:
    """Convert ``hf_path`` into a velox folder at ``mlx_path``; returns its kv_quant section.

    method_options: per-method calibration keywords, e.g. ``{"rabitq": {"nlist": 64}}``.
    sink: the first ``sink`` tokens stay in fp16 in every method's caches (recorded per method).

    The folder is built in a temporary directory beside the target and renamed into
    place at the end, so a failure leaves nothing behind.
    """
    target = Path(mlx_path)
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists (use --force to replace it)")
    names = parse_methods(kv)
    bits = {m: method_bits(m, key_bits, value_bits) for m in names}
    if not 0 <= sink <= MAX_SINK:
        raise ValueError(f"--kv-sink must be in 0..{MAX_SINK}, got {sink}")

    src = resolve_path(hf_path)
    model, tokenizer, config = mlx_lm_load(str(src), return_config=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_model(tmp, model)
        copy_tokenizer_files(src, tmp, tokenizer)
        float32_on_cpu(model)

        calib = load_calibration(tokenizer, calib_data, calib_tokens, calib_seq_len)
        t0 = time.perf_counter()
        acts = capture(model, calib.tokens, progress=progress)
        capture_seconds = time.perf_counter() - t0
        first = next((a for a in acts if a is not None), None)
        if first is None:
            raise ValueError("the model has no plain KVCache attention layer for velox to compress")
        _, num_kv_heads, head_dim = first.keys.shape

        methods, tensors = {}, {}
        for m in names:
            entry, t = calibrate_method(m, acts, model, *bits[m], seed, (method_options or {}).get(m), progress)
            if sink:
                entry["sink"] = sink
            methods[m] = entry
            tensors.update(t)
        del acts

        mx.save_safetensors(str(tmp / ARTIFACT_FILE), dict(sorted(tensors.items())),
                            metadata={"format": "velox"})
        kvq = {
            "format_version": FORMAT_VERSION,
            "velox_version": __version__,
            "default_method": names[0],
            "methods": methods,
            "model": {"num_layers": len(model.layers), "num_kv_heads": int(num_kv_heads),
                      "head_dim": int(head_dim)},
            "calibration": {"corpus": calib.corpus, "sha256": calib.sha256,
                            "tokens": int(calib.tokens.size), "seq_len": int(calib.tokens.shape[1]),
                            "seed": seed, "capture_seconds": round(capture_seconds, 2)},
            "artifacts": [{"file": ARTIFACT_FILE, "sha256": sha256_file(tmp / ARTIFACT_FILE)}],
        }
        config["kv_quant"] = kvq
        save_config(config, tmp / "config.json")
        base = str(hf_path) if not Path(hf_path).exists() else Path(hf_path).name
        (tmp / "README.md").write_text(render_card(kvq, base_model=base, name=target.name))

        if target.exists():  # --force: swap in the new folder, then drop the old one
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        return kvq
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
