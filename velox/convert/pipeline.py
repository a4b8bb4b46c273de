"""velox-convert's pipeline: plan (lazy load, -q quantization) → read and save the weights →
capture → calibrate every method → measure its cache bytes → write the folder."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm import __version__ as mlx_lm_version
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import compute_bits_per_weight, dequantize_model, quantize_model, save_config, save_model
from tqdm import tqdm

from .. import __version__
from ..cpu import float32_on_cpu
from ..format import ARTIFACT_FILE, FORMAT_VERSION, MAX_BITS, MAX_FP16_TOKENS, sha256_file
from ..methods import LayerSpec, get_method, outliers, ratequant
from ..methods.base import LayerActivations, no_calibration
from ..methods.rope import layer_rope, spec_rope
from ..model_cards import describe_weights, render_card
from ..runtime.cache import ExactCodec, VeloxKVCache
from ..runtime.layers import cache_layout
from ..runtime.loader import cache_factory, load_mlx_lm, resolve_path
from .calib_data import CalibrationSet, load_calibration
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
    first = next(a for a in acts if a is not None)
    _, num_kv_heads, head_dim = first.keys.shape
    value_dim = first.values.shape[-1]
    return LayerSpec(layer=i, num_kv_heads=num_kv_heads, head_dim=head_dim, key_bits=key_bits,
                     value_bits=value_bits, seed=seed, rope=layer_rope(model, i),
                     value_head_dim=value_dim if value_dim != head_dim else None)


def require_queries(method: str, layer: int, acts: LayerActivations) -> None:
    """Calibrations that weigh by attention need the layer's captured queries."""
    if acts.queries is None:
        raise ValueError(f"{method} calibrates on each layer's queries, and layer {layer}'s attention gave velox no "
                         "way to record them (it neither calls mlx_lm's scaled_dot_product_attention with its "
                         "cache's keys nor rotates the queries with its rope module); use a data-free method")


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
        if module.calibrate is not no_calibration:
            if spec.value_head_dim:
                raise ValueError(f"{name} calibrates keys before RoPE, and this model's caches hold keys of "
                                 f"{spec.head_dim} and values of {spec.value_head_dim} dims (MLA-style latent "
                                 "caches, or keys wider than values): use a data-free method")
            require_queries(name, i, layer_acts)
        fitted = module.calibrate(layer_acts, spec, **method_options)
        if n_outliers:
            pairs = spec_rope(spec).pairs
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
        require_queries(f"ratequant over {name}", i, layer_acts)
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


@dataclass
class Plan:
    """What ``convert`` will do, settled before anything is captured or written.

    model / tokenizer / config come from mlx_lm's lazy load: no weight has been read yet,
    and -q's quantization is already applied to the lazy model, so ``config`` holds the
    ``quantization`` section exactly as mlx_lm writes it.
    """

    hf_path: str
    source: Path
    target: Path
    methods: list[str]
    bits: dict[str, tuple[int, int]]  # method -> (key bits, value bits); ratequant's average without avg_bits
    alloc: str
    avg_bits: Optional[float]
    options: dict[str, dict]
    sink: int
    window: int
    seed: int
    caches: list[str]  # per layer: "plain" (velox codes it) or the native cache's class name
    num_kv_heads: int
    head_dim: int
    value_head_dim: int
    calib: CalibrationSet
    weights: Optional[dict]  # weight_quantization(); None: full-precision weights
    model: Any
    tokenizer: Any
    config: dict


def weight_quantization(model, config: dict, quantized_here: bool) -> Optional[dict]:
    """The folder's weight quantization -> {bits, group_size, mode, bits_per_weight, by}
    (by: "mlx_lm <version>" when -q quantized it here, "input" when it came quantized);
    None for full-precision weights. Shapes only: works on the lazy model."""
    q = config.get("quantization")
    if not q:
        return None
    return {"bits": q.get("bits"), "group_size": q.get("group_size"), "mode": q.get("mode", "affine"),
            "bits_per_weight": round(compute_bits_per_weight(model), 3),
            "by": f"mlx_lm {mlx_lm_version}" if quantized_here else "input"}


def load_source(src: Path, hf_path: str, quantize: bool, q_group_size: Optional[int], q_bits: Optional[int],
                q_mode: str) -> tuple[Any, Any, dict]:
    """mlx_lm's lazy load of ``src``, then, with ``quantize``, mlx_lm's ``quantize_model``
    (its defaults per mode, its config section) -> (model, tokenizer, config)."""
    model, tokenizer, config = load_mlx_lm(src, return_config=True, lazy=True)
    if not quantize:
        return model, tokenizer, config
    if "quantization" in config or "quantization_config" in config:
        info = weight_quantization(model, config, quantized_here=False)
        raise ValueError(f"{hf_path} is already quantized" + (f": {describe_weights(info)}" if info else "")
                         + ". Drop -q: velox-convert then adds kv_quant and keeps the weights as they are")
    with contextlib.redirect_stdout(io.StringIO()):  # mlx_lm prints bits per weight; the plan reports it
        model, config = quantize_model(model, config, q_group_size, q_bits, mode=q_mode)
    if not any(hasattr(m, "scales") for m in model.modules()):
        raise ValueError(f"-q quantized no layer: no weight's input size is a multiple of group size "
                         f"{config['quantization']['group_size']}")
    return model, tokenizer, config


def kv_layout(model) -> tuple[list[str], int, int, int]:
    """(per layer "plain" or the native cache's class name, num_kv_heads, head_dim and
    value_head_dim of the plain layers), from ``cache_layout``'s probe. MLX infers shapes
    without evaluating, so on a lazily loaded model no weight is read."""
    layout = cache_layout(model)
    return (["plain" if n is None else n for n in layout.native], layout.num_kv_heads, layout.head_dim,
            layout.value_head_dim)


def plan_conversion(hf_path: str, mlx_path: str, kv: str | Sequence[str] = "spectral",
                    key_bits: Optional[int] = None, value_bits: Optional[int] = None,
                    calib_data: Optional[str] = None, calib_tokens: int = 8192, calib_seq_len: int = 512,
                    seed: int = 0, force: bool = False, method_options: Optional[dict[str, dict]] = None,
                    sink: int = 0, window: int = 0, avg_bits: Optional[float] = None,
                    alloc: Optional[str] = None, quantize: bool = False, q_group_size: Optional[int] = None,
                    q_bits: Optional[int] = None, q_mode: str = "affine") -> Plan:
    """Check every option, load the model lazily (quantized with ``quantize``) and tokenize the
    calibration text: all that ``convert`` needs before capturing, and all --dry-run shows.

    Raises what the conversion would raise on these options (ValueError, FileExistsError,
    FileNotFoundError). Arguments as ``convert``'s.
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
    options = {m: dict((method_options or {}).get(m) or {}) for m in names}
    if alloc == "ratequant" and any("outliers" in o for o in options.values()):
        raise ValueError("--kv-outliers does not combine with RateQuant allocation yet")

    src = resolve_path(hf_path)
    model, tokenizer, config = load_source(src, hf_path, quantize, q_group_size, q_bits, q_mode)
    caches, num_kv_heads, head_dim, value_head_dim = kv_layout(model)
    for m, o in options.items():
        if o.get("outliers"):
            outliers.check(m, o["outliers"], head_dim)
    calib = load_calibration(tokenizer, calib_data, calib_tokens, calib_seq_len)
    return Plan(hf_path=str(hf_path), source=src, target=target, methods=names, bits=bits, alloc=alloc,
                avg_bits=avg_bits, options=options, sink=sink, window=window, seed=seed, caches=caches,
                num_kv_heads=int(num_kv_heads), head_dim=int(head_dim), value_head_dim=int(value_head_dim), calib=calib,
                weights=weight_quantization(model, config, quantize), model=model, tokenizer=tokenizer,
                config=config)


def read_weights(model, desc: str, progress: bool = True) -> None:
    """Evaluate the lazily loaded (and maybe quantized) weights tensor by tensor, behind a bar in bytes."""
    params = [p for _, p in tree_flatten(model.parameters())]
    with tqdm(total=sum(p.nbytes for p in params), desc=desc, unit="B", unit_scale=True,
              disable=not progress) as bar:
        for p in params:
            mx.eval(p)
            bar.update(p.nbytes)


def calibration_compute(model) -> None:
    """On MLX's CPU backend: compute in float32 (as velox.load does there) with quantized layers
    dequantized. Scales are cast first, so the dequantized weights are exactly the values the
    loaded quantized model multiplies by; CPU quantized matmuls are ~10× slower than BLAS."""
    float32_on_cpu(model)
    if mx.default_device() == mx.cpu:
        dequantize_model(model)


MEASURE_TOKENS = 1024  # a multiple of the caches' 256-token step: no allocation slack is counted


def layer_bytes_per_token(make_cache: Callable[[], list], num_kv_heads: int, head_dim: int,
                          value_head_dim: int, n: int = MEASURE_TOKENS) -> float:
    """Mean bytes one coded layer's VeloxKVCache holds per token once ``n`` tokens went in.

    make_cache: the loader's cache factory (``cache_factory``). Each VeloxKVCache gets
    keys/values [1, H, n, D] and reports its ``nbytes`` (codes, per-vector scalars, fp16
    sink/window). Those bytes depend on the token count only, so random vectors measure them.
    """
    keys = mx.random.normal((1, num_kv_heads, n, head_dim), key=mx.random.key(0))
    values = mx.random.normal((1, num_kv_heads, n, value_head_dim), key=mx.random.key(1))
    caches = [c for c in make_cache() if isinstance(c, VeloxKVCache)]
    for c in caches:
        c.update_and_fetch(keys, values)
    return sum(c.nbytes for c in caches) / (len(caches) * n)


def convert(hf_path: str, mlx_path: str, kv: str | Sequence[str] = "spectral",
            key_bits: Optional[int] = None, value_bits: Optional[int] = None,
            calib_data: Optional[str] = None, calib_tokens: int = 8192, calib_seq_len: int = 512,
            seed: int = 0, force: bool = False, progress: bool = True,
            method_options: Optional[dict[str, dict]] = None, sink: int = 0, window: int = 0,
            avg_bits: Optional[float] = None, alloc: Optional[str] = None, quantize: bool = False,
            q_group_size: Optional[int] = None, q_bits: Optional[int] = None, q_mode: str = "affine",
            repo_id: Optional[str] = None) -> dict:
    """Convert ``hf_path`` into a velox folder at ``mlx_path``; returns its kv_quant section.

    method_options: per-method calibration keywords, e.g. ``{"rabitq": {"nlist": 64}}``.
    sink / window: the first ``sink`` and the last ``window`` tokens stay in fp16 in every
    method's caches (recorded per method).
    avg_bits / alloc: average bits over keys and values, spread ``uniform``ly (an integer)
    or by ``ratequant`` per (layer, KV head, K/V); a fractional average implies ratequant.
    quantize / q_group_size / q_bits / q_mode: mlx_lm.convert's weight quantization (same
    defaults per mode), applied before calibration so the KV methods are fitted on the
    model users run.
    repo_id: the Hub repo the model card's usage names (default: the folder's name).

    The folder is built in a temporary directory beside the target and renamed into
    place at the end, so a failure leaves nothing behind.
    """
    plan = plan_conversion(hf_path, mlx_path, kv=kv, key_bits=key_bits, value_bits=value_bits,
                           calib_data=calib_data, calib_tokens=calib_tokens, calib_seq_len=calib_seq_len,
                           seed=seed, force=force, method_options=method_options, sink=sink, window=window,
                           avg_bits=avg_bits, alloc=alloc, quantize=quantize, q_group_size=q_group_size,
                           q_bits=q_bits, q_mode=q_mode)
    return write_folder(plan, progress=progress, repo_id=repo_id)


def write_folder(plan: Plan, progress: bool = True, repo_id: Optional[str] = None) -> dict:
    """Carry out ``plan``: read (quantize) and save the weights, capture, calibrate every method,
    measure its cache bytes, write kv_quant and the card -> the kv_quant section."""
    model, target = plan.model, plan.target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        quantizing = plan.weights is not None and plan.weights["by"] != "input"
        read_weights(model, "load + quantize" if quantizing else "load", progress)
        save_model(tmp, model)  # before calibration_compute: weights stay as loaded / quantized
        copy_tokenizer_files(plan.source, tmp, plan.tokenizer)
        calibration_compute(model)

        t0 = time.perf_counter()
        acts = capture(model, plan.calib.tokens, progress=progress)
        capture_seconds = time.perf_counter() - t0

        methods, tensors = {}, {}
        for m in plan.methods:
            options = plan.options[m]
            if plan.alloc == "ratequant":
                avg = plan.avg_bits if plan.avg_bits is not None else sum(plan.bits[m]) / 2
                entry, t = calibrate_ratequant(m, acts, model, avg, plan.seed, options, progress,
                                               tokens=plan.calib.tokens[:RATEQUANT_SEQUENCES])
            else:
                entry, t = calibrate_method(m, acts, model, *plan.bits[m], plan.seed, options, progress)
            entry.update({k: n for k, n in (("sink", plan.sink), ("window", plan.window)) if n})
            methods[m] = entry
            tensors.update(t)
        del acts

        mx.save_safetensors(str(tmp / ARTIFACT_FILE), dict(sorted(tensors.items())),
                            metadata={"format": "velox"})
        kvq = {
            "format_version": FORMAT_VERSION,
            "velox_version": __version__,
            "default_method": plan.methods[0],
            "methods": methods,
            "model": {"num_layers": len(model.layers), "num_kv_heads": plan.num_kv_heads,
                      "head_dim": plan.head_dim,
                      **({"value_head_dim": plan.value_head_dim} if plan.value_head_dim != plan.head_dim else {})},
            "calibration": {"corpus": plan.calib.corpus, "sha256": plan.calib.sha256,
                            "tokens": int(plan.calib.tokens.size), "seq_len": int(plan.calib.tokens.shape[1]),
                            "seed": plan.seed, "capture_seconds": round(capture_seconds, 2)},
            "artifacts": [{"file": ARTIFACT_FILE, "sha256": sha256_file(tmp / ARTIFACT_FILE)}],
        }
        for m, entry in methods.items():
            # the caches velox.load would build from what was written, after its checks (a model
            # they refuse gets no folder); their bytes are measured
            _, make_cache = cache_factory(model, tmp, kvq, m)
            entry["bytes_per_token_per_layer"] = round(
                layer_bytes_per_token(make_cache, plan.num_kv_heads, plan.head_dim, plan.value_head_dim), 2)
        config = dict(plan.config, kv_quant=kvq)
        save_config(config, tmp / "config.json")
        base = plan.hf_path if not Path(plan.hf_path).exists() else Path(plan.hf_path).name
        (tmp / "README.md").write_text(render_card(kvq, base_model=base, name=target.name,
                                                   measure_tokens=MEASURE_TOKENS, repo=repo_id,
                                                   weights=plan.weights))

        swap_into_place(tmp, target)
        return kvq
    finally:  # also on KeyboardInterrupt: nothing half-written stays beside the target
        shutil.rmtree(tmp, ignore_errors=True)
