"""velox-eval: quality per bit and memory per token of a velox folder, written where users look."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..cpu import float32_on_cpu, reexec_with_openblas

BASELINE_BITS = {"fp16": 16, "mlx8": 8, "mlx4": 4, "mlx2": 2}
QUALITY_FIELDS = ("key_bits", "value_bits", "ppl", "delta_ppl", "bytes_per_token")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="velox-eval", description=(
        "Measure a velox folder: teacher-forced perplexity where every scored token attends to the "
        "compressed cache, attention-output fidelity per layer, cache bytes per token, passkey retrieval, "
        "against mlx_lm's own caches in the same run."))
    p.add_argument("--model", required=True, help="velox folder or Hugging Face repo id")
    p.add_argument("--kv", default="all", help="methods to measure, comma-separated, or 'all' (default)")
    p.add_argument("--baselines", default="fp16,mlx8,mlx4", help="mlx_lm caches: fp16, mlx8, mlx4, mlx2")
    p.add_argument("--data", default=None, help="evaluation text (.txt/.jsonl; default: shipped Python docs FAQ/HOWTO)")
    p.add_argument("--tokens", type=int, default=3072, help="evaluation tokens (default: 3072)")
    p.add_argument("--window", type=int, default=1024, help="teacher-forced window length (default: 1024)")
    p.add_argument("--passkey-lengths", default="512,1024", help="passkey context lengths ('' to skip)")
    p.add_argument("--budget-gb", type=float, default=1.0, help="KV memory budget for the max-context column")
    p.add_argument("--json", default=None, help="write full results as JSON")
    p.add_argument("--plot", default=None, help="write a PNG: ΔPPL vs bits, bytes vs context")
    p.add_argument("--update-card", action="store_true",
                   help="write the results into the folder's README.md and config.json kv_quant.quality")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def evaluate(folder: Path, methods: list[str], baselines: list[str], text: str, n_tokens: int,
             window: int, passkey_lengths: tuple[int, ...], budget_gb: float, progress: bool = True) -> dict:
    """Run every measurement on the folder; returns the results dict that --json writes."""
    import mlx_lm
    import numpy as np

    from ..convert.capture import capture
    from ..eval import (attention_fidelity, bootstrap_delta, bytes_per_token, mlx_baseline_cache,
                        passkey_accuracy, teacher_forced_nll)
    from ..format import validate_kv_quant
    from ..methods import METHODS
    from ..kernels import attention_path
    from .cache import VeloxKVCache
    from .loader import install_kv_caches, read_kv_quant

    if n_tokens < max(window, 256):  # a teacher-forced window, and a 256-token cache step for bytes/token
        raise ValueError(f"--tokens ({n_tokens}) must be at least --window ({window}) and at least 256")
    model, tok = mlx_lm.load(str(folder))
    float32_on_cpu(model)
    kvq = validate_kv_quant(read_kv_quant(folder), len(model.layers), set(METHODS))
    ids = np.array(tok.encode(text))
    if len(ids) < min(n_tokens, window):
        raise ValueError(f"evaluation text has {len(ids)} tokens; at least {window} are needed")
    ids = ids[:n_tokens]
    fidelity_tokens = min(512, len(ids))  # attention fidelity on the first (up to) 512 tokens
    acts = capture(model, ids[None, :fidelity_tokens], progress=False)
    factories = {b: mlx_baseline_cache(model, b) for b in baselines}
    paths = {}
    for m in methods:
        install_kv_caches(model, folder, kvq, m)
        factories[m] = model.make_cache
        coded = [c for c in model.make_cache() if isinstance(c, VeloxKVCache)]
        paths[m] = attention_path(coded[0].key_codec, coded[0].value_codec) if coded[0].fast else "decoded history"
    results: dict[str, Any] = {"model": str(folder), "tokens": int(len(ids)), "window": window, "runs": {}}
    ref = teacher_forced_nll(model, ids, factories["fp16"], window=window, progress=progress)
    for name, make_cache in factories.items():
        res = ref if name == "fp16" else teacher_forced_nll(model, ids, make_cache, window=window,
                                                            progress=progress)
        bpt = bytes_per_token(model, make_cache, ids, n=min(1024, len(ids) // 256 * 256))
        entry = kvq["methods"].get(name, {})
        run = {
            "key_bits": entry.get("key_bits", BASELINE_BITS.get(name)),
            "value_bits": entry.get("value_bits", BASELINE_BITS.get(name)),
            "mean_nll": res.mean_nll, "ppl": res.ppl, "scored_tokens": res.tokens,
            "delta_ppl": res.ppl / ref.ppl - 1, "delta_ppl_ci95": bootstrap_delta(res.nll, ref.nll),
            "bytes_per_token": bpt, "max_context_in_budget": int(budget_gb * 1e9 // bpt),
            "attention": attention_fidelity(acts, make_cache, length=fidelity_tokens),
            "decode_attention": paths.get(name, "mlx_lm"),  # what a decode step reads, on this backend
        }
        if passkey_lengths:
            run["passkey"] = passkey_accuracy(model, tok, make_cache, text, lengths=passkey_lengths)
        results["runs"][name] = run
    return results


def results_table(results: dict) -> str:
    """Markdown table of the headline numbers."""
    lines = ["| cache | K bits | V bits | bytes/token | PPL | ΔPPL vs fp16 (95% CI) | attn out rel err | passkey "
             "| decode attends from |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        ci = r["delta_ppl_ci95"]
        delta = f"{100 * r['delta_ppl']:+.2f}% ({100 * ci[0]:+.2f}, {100 * ci[1]:+.2f})"
        attn = sum(a["output_rel_error"] for a in r["attention"]) / max(1, len(r["attention"]))
        pk = f"{100 * r['passkey']['accuracy']:.0f}%" if "passkey" in r else "–"
        lines.append(f"| {name} | {r['key_bits']} | {r['value_bits']} | {r['bytes_per_token']:.0f} | "
                     f"{r['ppl']:.3f} | {delta} | {attn:.4f} | {pk} | {r.get('decode_attention', '–')} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    """PNG with ΔPPL vs bits per element and KV bytes vs context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    contexts = [1024 * 2**i for i in range(8)]
    for name, r in results["runs"].items():
        bits = (r["key_bits"] + r["value_bits"]) / 2
        marker = "s" if name in BASELINE_BITS else "o"
        ax1.scatter(bits, 100 * r["delta_ppl"], marker=marker, label=name)
        ax1.annotate(name, (bits, 100 * r["delta_ppl"]), fontsize=8)
        ax2.plot(contexts, [c * r["bytes_per_token"] / 2**20 for c in contexts], marker=marker, label=name)
    ax1.set_yscale("symlog", linthresh=1.0)  # 2-bit baselines sit at +1000s of %
    ax1.set_xlabel("bits per element (mean of K and V)")
    ax1.set_ylabel("ΔPPL vs fp16 (%)")
    ax1.set_title("quality per bit")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("context (tokens)")
    ax2.set_ylabel("KV cache (MiB)")
    ax2.set_title("memory vs context")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_card(folder: Path, results: dict) -> None:
    """Write the results table into README.md and a quality block into config.json's kv_quant."""
    from ..model_cards import QUALITY_END, QUALITY_START

    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["kv_quant"]["quality"] = {
        "tokens": results["tokens"], "window": results["window"],
        "runs": {name: {k: r[k] for k in QUALITY_FIELDS} for name, r in results["runs"].items()},
    }
    tmp = config_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=4))
    tmp.replace(config_path)
    card = (folder / "README.md").read_text()
    block = f"{QUALITY_START}\n## Measured quality (velox-eval)\n\n{results_table(results)}{QUALITY_END}"
    if QUALITY_START in card:
        head, rest = card.split(QUALITY_START, 1)
        card = head + block + rest.split(QUALITY_END, 1)[1]
    else:
        card = card.rstrip() + "\n\n" + block + "\n"
    (folder / "README.md").write_text(card)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        reexec_with_openblas()
    args = build_parser().parse_args(argv)
    from ..convert.calib_data import EVAL_CORPUS, read_text
    from ..format import VeloxFormatError
    from .loader import read_kv_quant, resolve_path

    try:
        folder = resolve_path(args.model)
        kvq = read_kv_quant(folder)
        methods = list(kvq.get("methods", {})) if args.kv == "all" else [m for m in args.kv.split(",") if m]
        baselines = [b for b in args.baselines.split(",") if b]
        if "fp16" not in baselines:
            baselines.insert(0, "fp16")  # ΔPPL needs the reference
        lengths = tuple(int(x) for x in args.passkey_lengths.split(",") if x)
        text = read_text(Path(args.data) if args.data else EVAL_CORPUS)
        results = evaluate(folder, methods, baselines, text, args.tokens, args.window, lengths,
                           args.budget_gb, progress=not args.quiet)
    except (VeloxFormatError, ValueError, FileNotFoundError) as e:
        print(f"velox-eval: error: {e}", file=sys.stderr)
        return 2
    print(results_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)
    if args.update_card:
        update_card(folder, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
