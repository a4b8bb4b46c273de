"""velox-convert's pipeline: load → capture → calibrate every method → write the folder."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import load as mlx_lm_load
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import save_config, save_model
from tqdm import tqdm

from .. import __version__
from ..cpu import float32_on_cpu
from ..format import ARTIFACT_FILE, FORMAT_VERSION, MAX_BITS, MAX_FP16_TOKENS, sha256_file
from ..methods import LayerSpec, get_method, outliers, ratequant
from ..methods.rope import layer_rope, spec_rope
from ..model_cards import render_card
from ..runtime.cache import ExactCodec, VeloxKVCache
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


def parse_allocation(avg_bits: Optional[float], alloc: Optional[str], key_bits: Optional[int],
                     value_bits: Optional[int]) -> tuple[str, Optional[int], Optional[int]]:
    """--kv-bits/--kv-alloc against --kv-key-bits/--kv-value-bits -> (alloc, key bits, value bits)."""
    if alloc not in (None, "uniform", "ratequant"):
        raise ValueError(f"--kv-alloc must be uniform or ratequant, got {alloc!r}")
    if avg_bits is None:
        return alloc or "uniform", key_bits, value_bits
    if key_bits is not None or value_bits is not None:
        raise ValueError("give either --kv-bits (the K/V average) or --kv-key-bits/--kv-value-bits, not both")
    if not 1 <= avg_bits <= MAX_BITS:
        raise ValueError(f"--kv-bits must be in 1..{MAX_BITS}, got {avg_bits}")
    whole = float(avg_bits).is_integer()
    if alloc == "uniform" and not whole:
        raise ValueError(f"--kv-bits {avg_bits} is fractional: uniform allocation needs whole bits "
                         "(use --kv-alloc ratequant)")
    alloc = alloc or ("uniform" if whole else "ratequant")
    return alloc, (int(avg_bits) if alloc == "uniform" else None), (int(avg_bits) if alloc == "uniform" else None)


def _layer_spec(model, acts: list, i: int, key_bits: int, value_bits: int, seed: int) -> LayerSpec:
    _, num_kv_heads, head_dim = next(a for a in acts if a is not None).keys.shape
    return LayerSpec(layer=i, num_kv_heads=num_kv_heads, head_dim=head_dim, key_bits=key_bits,
                     value_bits=value_bits, seed=seed, rope=layer_rope(model, i))


def calibrate_method(name: str, acts: list, model, key_bits: int, value_bits: int, seed: int,
                     options: Optional[dict] = None, progress: bool = True) -> tuple[dict, dict]:
    """Run one method's calibration on every layer -> (kv_quant method entry, tensors).

    options: keyword arguments of the method's ``calibrate`` (e.g. rabitq's nlist),
    recorded in the entry.
    """
    module = get_method(name)
    options = dict(options or {})
    method_options = {k: v for k, v in options.items() if k != "outliers"}
    n_outliers = options.get("outliers", 0)
    if n_outliers:
        outliers.check(name, n_outliers, next(a for a in acts if a is not None).keys.shape[-1])
    layers, tensors, per_layer = [], {}, []
    start = time.perf_counter()
    for i, layer_acts in enumerate(tqdm(acts, desc=f"calibrate {name}", disable=not progress)):
        if layer_acts is None:
            layers.append({"layer": i, "cache": "native"})
            continue
        t0 = time.perf_counter()
        spec = _layer_spec(model, acts, i, key_bits, value_bits, seed)
        fitted = module.calibrate(layer_acts, spec, **method_options)
        if n_outliers:
            pairs = spec_rope(spec, name).pairs if spec.rope else np.arange(spec.head_dim).reshape(-1, 2)
            fitted.update(outliers.fit(layer_acts.keys, n_outliers, pairs))
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


RATEQUANT_SEQUENCES = 2  # calibration sequences for RateQuant's per-layer loss weights
KL_STRIDE = 4
PROBE_BITS = 2  # width at which each layer's loss sensitivity is measured


def layer_kl(model, tokens: np.ndarray, layer_codecs: list, part: int) -> np.ndarray:
    """Mean KL(exact ‖ coded) of the next-token distributions over ``tokens [S, T]`` when only
    layer l's keys (part 0) or values (part 1) are coded, for each layer -> [L] (0 where
    layer_codecs[l] is None)."""
    x = mx.array(tokens)
    # Every KL_STRIDE-th position: the softmax over the vocabulary costs as much as the model here.
    ref = nn.log_softmax(model(x)[:, ::KL_STRIDE].astype(mx.float32), axis=-1)
    p_ref = mx.exp(ref)
    out = np.zeros(len(layer_codecs))
    for i, codecs in enumerate(layer_codecs):
        if codecs is None:
            continue
        pair = [ExactCodec(), ExactCodec()]
        pair[part] = codecs[part]
        caches = make_prompt_cache(model)
        caches[i] = VeloxKVCache(*pair)
        logq = nn.log_softmax(model(x, cache=caches)[:, ::KL_STRIDE].astype(mx.float32), axis=-1)
        out[i] = mx.mean(mx.sum(p_ref * (ref - logq), axis=-1)).item()
    return out


def calibrate_ratequant(name: str, acts: list, model, avg_bits: float, seed: int,
                        options: Optional[dict] = None, progress: bool = True,
                        tokens: Optional[np.ndarray] = None) -> tuple[dict, dict]:
    """RateQuant on top of method ``name``: measure every (layer, KV head, K/V)'s
    attention-output error at each candidate width, fit D(b) = α·β^(−b), allocate integer
    bits averaging ``avg_bits`` -> (kv_quant method entry with per-head bit lists, tensors).

    tokens [S, T] (calibration sequences): if given, each layer's output errors are put on
    one scale across layers by the model's own loss: they are multiplied by w_l =
    KL_l / Σ_h D_lh, where KL_l is the next-token KL divergence with only that layer's K
    (or V) coded at the probe width. Attention-output errors alone treat every layer's
    relative error as equally harmful, which measured nearly no better than uniform.
    """
    module = get_method(name)
    options = dict(options or {})
    cands = {kind: ratequant.candidate_bits(module, kind) for kind in ("key", "value")}
    widths = sorted(set(cands["key"]) | set(cands["value"]))
    start = time.perf_counter()
    fitted, errors, live = {}, {"key": [], "value": []}, []
    for i, layer_acts in enumerate(tqdm(acts, desc=f"ratequant {name}", disable=not progress)):
        if layer_acts is None:
            continue
        live.append(i)
        per_width = {"key": [], "value": []}
        for b in widths:
            spec = ratequant.width_spec(module, _layer_spec(model, acts, i, 0, 0, seed), b)
            fitted[i, b] = module.calibrate(layer_acts, spec, **options)
            dk, dv = ratequant.output_errors(layer_acts, *module.make_codecs(fitted[i, b], spec))
            for kind, d in (("key", dk), ("value", dv)):
                if b in cands[kind]:
                    per_width[kind].append(d)
        for kind in errors:
            errors[kind].append(np.stack(per_width[kind], axis=-1))  # [H, C]
    if tokens is not None:
        for part, kind in enumerate(("key", "value")):
            probe = cands[kind].index(min(cands[kind], key=lambda c: abs(c - PROBE_BITS)))
            codecs = [None] * len(acts)
            for i in live:
                spec = ratequant.width_spec(module, _layer_spec(model, acts, i, 0, 0, seed), cands[kind][probe])
                codecs[i] = module.make_codecs(fitted[i, cands[kind][probe]], spec)
            kl = layer_kl(model, tokens, codecs, part)[live]
            errs = np.stack(errors[kind])  # [layers, H, C]
            weight = np.maximum(kl, 1e-9) / np.maximum(errs[:, :, probe].sum(axis=1), 1e-12)
            errors[kind] = list(errs * weight[:, None, None])
    alpha, beta, lo, hi = [], [], [], []
    for kind in ("key", "value"):
        a, b = ratequant.fit_distortion(cands[kind], np.stack(errors[kind]))  # [layers, H]
        alpha.append(a.reshape(-1)), beta.append(b.reshape(-1))
        lo.append(np.full(a.size, min(cands[kind]))), hi.append(np.full(a.size, max(cands[kind])))
    units = sum(len(a) for a in alpha)
    total = int(round(avg_bits * units))
    bits = ratequant.allocate(*(np.concatenate(x) for x in (alpha, beta, lo, hi)), total)
    n_keys = len(alpha[0])
    H = np.stack(errors["key"]).shape[1]
    kbits, vbits = bits[:n_keys].reshape(-1, H), bits[n_keys:].reshape(-1, H)
    layers, tensors = [], {}
    for i in range(len(acts)):
        if i not in live:
            layers.append({"layer": i, "cache": "native"})
            continue
        j = live.index(i)
        kb, vb = kbits[j].tolist(), vbits[j].tolist()
        layers.append({"layer": i, "key_bits": kb, "value_bits": vb})
        for b in sorted(set(kb) | set(vb)):
            tensors.update({f"{name}.layers.{i}.bits{b}.{k}": v for k, v in fitted[i, b].items()})
    entry = {"alloc": "ratequant", "bits": avg_bits, "achieved_bits": round(total / units, 4),
             "key_bits": round(float(kbits.mean()), 3), "value_bits": round(float(vbits.mean()), 3),
             "decay": {kind: round(float(np.median(b)), 2) for kind, b in zip(("key", "value"), beta)},
             "fit_seconds": round(time.perf_counter() - start, 2), "layers": layers}
    if options:
        entry["options"] = options
    return entry, tensors


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished folder ``tmp`` to ``target``. An existing target (--force) is moved
    aside first and put back if the rename fails, so it is replaced whole or not at all."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    try:
        os.replace(target, old / "x")
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old / "x", target)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def convert(hf_path: str, mlx_path: str, kv: str | Sequence[str] = "spectral",
            key_bits: Optional[int] = None, value_bits: Optional[int] = None,
            calib_data: Optional[str] = None, calib_tokens: int = 8192, calib_seq_len: int = 512,
            seed: int = 0, force: bool = False, progress: bool = True,
            method_options: Optional[dict[str, dict]] = None, sink: int = 0, window: int = 0,
            avg_bits: Optional[float] = None, alloc: Optional[str] = None) -> dict:
    """Convert ``hf_path`` into a velox folder at ``mlx_path``; returns its kv_quant section.

    method_options: per-method calibration keywords, e.g. ``{"rabitq": {"nlist": 64}}``.
    sink / window: the first ``sink`` and the last ``window`` tokens stay in fp16 in every
    method's caches (recorded per method).
    avg_bits / alloc: average bits over keys and values, spread ``uniform``ly (an integer)
    or by ``ratequant`` per (layer, KV head, K/V); a fractional average implies ratequant.

    The folder is built in a temporary directory beside the target and renamed into
    place at the end, so a failure leaves nothing behind.
    """
    target = Path(mlx_path)
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists (use --force to replace it)")
    names = parse_methods(kv)
    alloc, key_bits, value_bits = parse_allocation(avg_bits, alloc, key_bits, value_bits)
    bits = {m: method_bits(m, key_bits, value_bits) for m in names}
    for flag, n in (("--kv-sink", sink), ("--kv-window", window)):
        if not 0 <= n <= MAX_FP16_TOKENS:
            raise ValueError(f"{flag} must be in 0..{MAX_FP16_TOKENS}, got {n}")

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
            options = (method_options or {}).get(m)
            if alloc == "ratequant":
                if options and "outliers" in options:
                    raise ValueError("--kv-outliers does not combine with RateQuant allocation yet")
                avg = avg_bits if avg_bits is not None else sum(bits[m]) / 2
                entry, t = calibrate_ratequant(m, acts, model, avg, seed, options, progress,
                                               tokens=calib.tokens[:RATEQUANT_SEQUENCES])
            else:
                entry, t = calibrate_method(m, acts, model, *bits[m], seed, options, progress)
            entry.update({k: n for k, n in (("sink", sink), ("window", window)) if n})
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

        swap_into_place(tmp, target)
        return kvq
    finally:  # also on KeyboardInterrupt: nothing half-written stays beside the target
        shutil.rmtree(tmp, ignore_errors=True)
