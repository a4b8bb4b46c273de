"""velox-convert: calibrate KV-cache quantization and write a self-describing folder."""

from __future__ import annotations

import argparse
import sys

from ..methods import METHODS
from ..cpu import reexec_with_openblas


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="velox-convert",
        description="Convert a Hugging Face / MLX model into a folder with calibrated KV-cache quantization "
                    "(weights, tokenizer, config.json kv_quant, kv_quant.safetensors, model card).")
    p.add_argument("--hf-path", required=True, help="local model folder or Hugging Face repo id")
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
    p.add_argument("--calib-data", default=None,
                   help="calibration text: .txt, or .jsonl with a \"text\" field (default: shipped Python docs excerpt)")
    p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens (default: 8192)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="calibration sequence length (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default: 0)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
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
    if args.kv_outliers:
        for m in args.kv.split(","):
            opts.setdefault(m.strip(), {})["outliers"] = args.kv_outliers
    return opts


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        reexec_with_openblas()
    args = build_parser().parse_args(argv)
    from .pipeline import convert  # heavy imports after argument parsing

    try:
        kvq = convert(args.hf_path, args.mlx_path, kv=args.kv, key_bits=args.kv_key_bits,
                      value_bits=args.kv_value_bits, calib_data=args.calib_data,
                      calib_tokens=args.calib_tokens, calib_seq_len=args.calib_seq_len,
                      seed=args.seed, force=args.force, progress=not args.quiet, sink=args.kv_sink, window=args.kv_window,
                      avg_bits=args.kv_bits, alloc=args.kv_alloc,
                      method_options=method_options(args))
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"velox-convert: error: {e}", file=sys.stderr)
        return 2
    cal = kvq["calibration"]
    print(f"wrote {args.mlx_path}: calibrated on {cal['tokens']} tokens of {cal['corpus']} "
          f"(capture {cal['capture_seconds']:.1f} s)")
    print(f"{'method':<16} {'K bits':>6} {'V bits':>6} {'fit s':>7}")
    for name, entry in kvq["methods"].items():
        print(f"{name:<16} {entry['key_bits']:>6} {entry['value_bits']:>6} {entry['fit_seconds']:>7.1f}"
              + (f"  (ratequant: {entry['achieved_bits']} bits on average)" if "alloc" in entry else ""))
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
