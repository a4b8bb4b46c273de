"""velox-convert: calibrate KV-cache quantization and write a self-describing folder."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..methods import METHODS
from ..cpu import reexec_with_openblas

Q_MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")  # mlx_lm.convert's --q-mode choices (0.32)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="velox-convert",
        description="Convert a Hugging Face / MLX model into a folder with calibrated KV-cache quantization "
                    "(weights, tokenizer, config.json kv_quant, kv_quant.safetensors, model card).")
    p.add_argument("--hf-path", required=True,
                   help="local model folder or Hugging Face repo id (an already-quantized MLX model keeps its "
                        "weights as they are)")
    p.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    p.add_argument("--kv", default="spectral",
                   help=f"comma-separated KV methods to calibrate; the first is the default "
                        f"(available: {', '.join(sorted(METHODS))})")
    p.add_argument("--kv-key-bits", type=int, default=None, help="key bits per element (default: per method)")
    p.add_argument("--kv-value-bits", type=int, default=None, help="value bits per element (default: per method)")
    p.add_argument("--kv-bits", type=float, default=None,
                   help="average bits per element over keys and values (a fractional value such as 2.5 "
                        "implies --kv-alloc ratequant)")
    p.add_argument("--kv-alloc", choices=("uniform", "ratequant"), default=None,
                   help="how --kv-bits is spread: the same for every head, or RateQuant per (layer, KV head, "
                        "K/V) from measured attention-output errors (default: uniform for whole bits)")
    p.add_argument("--kv-sink", type=int, default=0,
                   help="keep the first N tokens of every sequence in fp16 (attention sinks; default 0)")
    p.add_argument("--kv-window", type=int, default=0,
                   help="keep the most recent W tokens in fp16 (KIVI's residual window; default 0)")
    p.add_argument("--kv-outliers", type=int, default=0,
                   help="keep the K key channels (whole RoPE pairs) with the most calibration energy at 8 bits "
                        "(data-free methods: turboquant_mse/prod/rvq, qjl; default 0)")
    p.add_argument("--rabitq-nlist", type=int, default=None,
                   help="rabitq: IVF centroids per KV head, 1..256 (default: 64)")
    p.add_argument("--spectral-basis", choices=("full", "pairs"), default=None,
                   help="spectral: the keys' eigenbasis over all dims (full, default), or rotations within RoPE "
                        "pairs only (pairs: it commutes with RoPE, so attention reads the codes; see "
                        "docs/BENCHMARKS.md for its quality)")
    p.add_argument("--calib-data", default=None,
                   help="calibration text: .txt, or .jsonl with a \"text\" field (default: shipped Python docs excerpt)")
    p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens (default: 8192)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="calibration sequence length (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default: 0)")
    p.add_argument("-q", "--quantize", action="store_true",
                   help="quantize the weights with mlx_lm (as mlx_lm.convert -q) before calibrating, so the "
                        "KV methods are fitted on the model that runs; refused for an already-quantized input")
    p.add_argument("--q-group-size", type=int, default=None,
                   help="weight quantization group size (default per --q-mode, as mlx_lm: affine 64, mxfp4 32, "
                        "nvfp4 16, mxfp8 32)")
    p.add_argument("--q-bits", type=int, default=None,
                   help="bits per weight (default per --q-mode, as mlx_lm: 8 for mxfp8, else 4)")
    p.add_argument("--q-mode", choices=Q_MODES, default="affine", help="weight quantization mode (default: affine)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (model, layers, KV heads, methods and bits, calibration, output, weight "
                        "quantization) and stop: nothing is captured or written")
    p.add_argument("--eval", action="store_true",
                   help="after converting, run a short velox-eval (2048 tokens vs fp16 and mlx_lm 4-bit) "
                        "and write the results into the model card")
    p.add_argument("--upload-repo", default=None,
                   help="Hugging Face repo id (user/name) to upload the folder to afterwards "
                        "(created if needed; token from HF_TOKEN or login)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def method_options(args) -> dict[str, dict]:
    """Per-method calibration options from the flags (recorded in kv_quant)."""
    opts: dict[str, dict] = {}
    if args.rabitq_nlist:
        opts["rabitq"] = {"nlist": args.rabitq_nlist}
    if args.spectral_basis:
        opts["spectral"] = {"basis": args.spectral_basis}
    if args.kv_outliers:
        for m in args.kv.split(","):
            opts.setdefault(m.strip(), {})["outliers"] = args.kv_outliers
    return opts


def plan_kwargs(args) -> dict:
    """plan_conversion's keywords from the parsed flags."""
    return dict(hf_path=args.hf_path, mlx_path=args.mlx_path, kv=args.kv, key_bits=args.kv_key_bits,
                value_bits=args.kv_value_bits, calib_data=args.calib_data, calib_tokens=args.calib_tokens,
                calib_seq_len=args.calib_seq_len, seed=args.seed, force=args.force,
                method_options=method_options(args), sink=args.kv_sink, window=args.kv_window,
                avg_bits=args.kv_bits, alloc=args.kv_alloc, quantize=args.quantize,
                q_group_size=args.q_group_size, q_bits=args.q_bits, q_mode=args.q_mode)


def method_plan(plan, name: str) -> str:
    """One method's line of the dry-run plan: its bits, fp16 regions and options."""
    if plan.alloc == "ratequant":
        avg = plan.avg_bits if plan.avg_bits is not None else sum(plan.bits[name]) / 2
        what = f"RateQuant, {avg} bits on average per (layer, KV head, K/V)"
    else:
        what = "K {} bits, V {} bits".format(*plan.bits[name])
    extras = [f"{k} {n}" for k, n in (("sink", plan.sink), ("window", plan.window)) if n]
    extras += [f"{k} {v}" for k, v in plan.options[name].items()]
    return f"  {name:<16} {what}" + (f" ({', '.join(extras)})" if extras else "")


def describe_plan(plan, after: list[str]) -> str:
    """--dry-run's report. after: what velox-convert would run once the folder is written."""
    from ..model_cards import describe_weights

    coded = plan.caches.count("plain")
    native = [f"{i} ({c})" for i, c in enumerate(plan.caches) if c != "plain"]
    w = plan.weights
    weights = (describe_weights(w) if w is None else
               f"kept as the input quantized them: {describe_weights(w)}" if w["by"] == "input" else
               f"quantized by {w['by']}: {describe_weights(w)}")
    tokens = plan.calib.tokens
    return "\n".join([
        "velox-convert --dry-run (nothing captured or written)",
        f"model        {plan.hf_path} ({plan.config.get('model_type', '?')}, {len(plan.caches)} layers)",
        f"weights      {weights}",
        f"KV caches    {coded} plain KVCache layers coded by velox; native: {', '.join(native) or 'none'}",
        f"KV heads     {plan.num_kv_heads} per layer, head_dim {plan.head_dim}"
        + (f" (values {plan.value_head_dim})" if plan.value_head_dim != plan.head_dim else ""),
        "methods      (the first is the default)",
        *(method_plan(plan, m) for m in plan.methods),
        f"calibration  {tokens.size} tokens ({tokens.shape[0]} sequences of {tokens.shape[1]}) of "
        f"{plan.calib.corpus}, seed {plan.seed}",
        f"output       {plan.target}" + (" (exists: replaced, --force)" if plan.target.exists() else ""),
        *([f"then         {', '.join(after)}"] if after else []),
    ])


def summary(kvq: dict, weights: Optional[dict], path: str) -> str:
    """The table printed after a conversion: per method its bits, measured cache bytes and fit time.

    weights: the plan's weight quantization (None: full precision)."""
    from ..model_cards import describe_weights, fp16_bytes_per_token_per_layer
    from .pipeline import MEASURE_TOKENS

    cal, fp16 = kvq["calibration"], fp16_bytes_per_token_per_layer(kvq)
    lines = [f"wrote {path}: calibrated on {cal['tokens']} tokens of {cal['corpus']} "
             f"(capture {cal['capture_seconds']:.1f} s); weights: {describe_weights(weights)}",
             f"{'method':<16} {'K bits':>6} {'V bits':>6} {'B/token/layer':>13} {'vs fp16':>8} {'calib s':>8}"]
    for name, e in kvq["methods"].items():
        b = e["bytes_per_token_per_layer"]
        lines.append(f"{name:<16} {e['key_bits']:>6} {e['value_bits']:>6} {b:>13.1f} {fp16 / b:>7.1f}× "
                     f"{e['fit_seconds']:>8.1f}"
                     + (f"  (ratequant: {e['achieved_bits']} bits on average)" if "alloc" in e else ""))
    lines.append(f"(bytes read from each method's caches after {MEASURE_TOKENS} tokens, mean over coded layers; "
                 f"fp16: {fp16})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        reexec_with_openblas()
    args = build_parser().parse_args(argv)
    from .pipeline import plan_conversion, write_folder  # heavy imports after argument parsing

    try:
        plan = plan_conversion(**plan_kwargs(args))
        if args.dry_run:
            after = (["velox-eval (--eval)"] if args.eval else []) + (
                [f"upload to {args.upload_repo}"] if args.upload_repo else [])
            print(describe_plan(plan, after))
            return 0
        kvq = write_folder(plan, progress=not args.quiet, repo_id=args.upload_repo)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"velox-convert: error: {e}", file=sys.stderr)
        return 2
    print(summary(kvq, plan.weights, args.mlx_path))
    if args.eval:
        from ..runtime.evaluate import main as eval_main

        rc = eval_main(["--model", args.mlx_path, "--tokens", "2048", "--baselines", "fp16,mlx4",
                        "--passkey-lengths", "", "--update-card", *(["--quiet"] if args.quiet else [])])
        if rc:
            return rc
    if args.upload_repo:  # last, so the uploaded card carries the --eval results
        from ..hub import upload_or_report

        return upload_or_report(args.mlx_path, args.upload_repo, prog="velox-convert")
    return 0


if __name__ == "__main__":
    sys.exit(main())
