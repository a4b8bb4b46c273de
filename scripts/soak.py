"""Soak: push many tokens through each velox cache of a folder, watching memory.

The cache is filled with real text (the shipped evaluation excerpt, repeated as needed) in
``--chunk``-token pieces, and after every ``--every`` tokens the model also generates
``--decode`` tokens greedily one step at a time (they stay in the context), so both the
prefill and the one-token decode paths run at every length. ``--chunk 1 --decode 0`` is
pure token-by-token feeding. At each sample it records the cache's bytes (``cache.nbytes``,
measured from its arrays), the process RSS and MLX's active memory. A healthy cache grows
its bytes linearly at its bytes per token, and memory stays flat apart from that growth (no
leak, no quadratic copies). At the end it trims ``--trim`` tokens off the cache and
re-generates them: greedy decoding must give the same tokens as the first pass.

    python scripts/soak.py --model out/smollm2-kv --tokens 20000 --every 1000 --json soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

import velox  # noqa: E402
from velox.cpu import reexec_with_openblas  # noqa: E402
from velox.runtime.loader import read_kv_quant  # noqa: E402


def rss_bytes() -> int:
    """The process's current resident set (Linux /proc); peak RSS elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def tokenizer_ids(folder: str) -> list[int]:
    """The shipped evaluation excerpt (third-party text), tokenized with the folder's tokenizer."""
    from transformers import AutoTokenizer

    text = (ROOT / "velox" / "data" / "eval_python_docs.txt").read_text()
    return AutoTokenizer.from_pretrained(folder).encode(text)


def step(model, token: int, cache: list) -> int:
    """One greedy decode step -> the next token."""
    logits = model(mx.array([[token]]), cache=cache)
    nxt = mx.argmax(logits[0, -1]).item()
    return int(nxt)


def soak(model, text: list[int], tokens: int, chunk: int, every: int, decode: int, trim: int,
         max_seconds: float = float("inf")) -> dict:
    """Fill a fresh cache to ``tokens`` tokens (``text`` in ``chunk``-token pieces, ``decode``
    greedy steps after every ``every``), sampling memory as it goes, then the trim check
    (fewer tokens if ``max_seconds`` runs out first)."""
    cache = make_prompt_cache(model)
    samples, out, pos = [], [], 0
    start = time.perf_counter()
    while cache[0].offset < tokens:
        n = min(chunk, tokens - cache[0].offset, every - cache[0].offset % every)
        piece = [text[(pos + i) % len(text)] for i in range(n)]
        pos += n
        logits = model(mx.array([piece]), cache=cache)
        mx.eval(logits)
        if cache[0].offset % every and cache[0].offset < tokens:
            continue
        token = int(mx.argmax(logits[0, -1]).item())
        out = [token]
        for _ in range(decode):
            token = step(model, token, cache)
            out.append(token)
        mx.clear_cache()  # freed buffers MLX keeps for reuse are not a leak
        # MLX's active bytes: device memory on a GPU, where RSS does not see the cache
        samples.append({"tokens": cache[0].offset, "cache_bytes": sum(c.nbytes for c in cache),
                        "rss_bytes": rss_bytes(), "active_bytes": mx.get_active_memory(),
                        "seconds": round(time.perf_counter() - start, 2)})
        if samples[-1]["seconds"] > max_seconds:
            break
    result = {"samples": samples, "generated_tokens": decode * len(samples)}
    if trim and all(c.is_trimmable() for c in cache):
        # out[k] was produced after feeding out[k-1] (the last one was never fed): drop the last
        # `trim` fed tokens, out[-trim-1:-1], and feed them again from out[-trim-1].
        for _ in range(trim + 1 - len(out)):
            out.append(step(model, out[-1], cache))
        for c in cache:
            c.trim(trim)
        token, again = out[-trim - 1], []
        for _ in range(trim):
            token = step(model, token, cache)
            again.append(token)
        result["trim_tokens"] = trim
        result["trim_same_tokens"] = again == out[-trim:]
    return result


def slope(samples: list[dict], key: str) -> float:
    """Least-squares bytes per token of ``key`` over the samples."""
    xs = [s["tokens"] for s in samples]
    ys = [s[key] for s in samples]
    n, mx_, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx_) ** 2 for x in xs)
    return sum((x - mx_) * (y - my) for x, y in zip(xs, ys)) / var if n > 1 and var else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a velox folder")
    parser.add_argument("--kv", default=None, help="methods, comma-separated (default: all calibrated)")
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--trim", type=int, default=16, help="tokens to trim and re-generate at the end (0: skip)")
    parser.add_argument("--chunk", type=int, default=256, help="tokens of text per forward pass (default 256)")
    parser.add_argument("--decode", type=int, default=16,
                        help="greedy one-token steps after every --every tokens (default 16)")
    parser.add_argument("--json", default=None, help="write the samples here")
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="per method: stop generating at the first sample past this (the report says how far it got)")
    args = parser.parse_args(argv)
    reexec_with_openblas()

    methods = args.kv.split(",") if args.kv else list(read_kv_quant(Path(args.model))["methods"])
    text = tokenizer_ids(args.model)
    report = {}
    for method in methods:
        model, _ = velox.load(args.model, kv=method)
        r = soak(model, text, args.tokens, args.chunk, args.every, args.decode, args.trim, args.max_seconds)
        s = r["samples"]
        r["cache_bytes_per_token"] = round(slope(s, "cache_bytes"), 2)
        grown = s[-1]["cache_bytes"] - s[0]["cache_bytes"]
        r["rss_growth_minus_cache"] = s[-1]["rss_bytes"] - s[0]["rss_bytes"] - grown
        r["active_growth_minus_cache"] = s[-1]["active_bytes"] - s[0]["active_bytes"] - grown
        report[method] = r
        print(f"{method:16s} {s[-1]['tokens']:7d} tokens  cache {s[-1]['cache_bytes'] / 2**20:8.2f} MiB "
              f"({r['cache_bytes_per_token']:.1f} B/token)  RSS {s[-1]['rss_bytes'] / 2**20:8.1f} MiB "
              f"(growth beyond cache {r['rss_growth_minus_cache'] / 2**20:+.1f} MiB; MLX active "
              f"{r['active_growth_minus_cache'] / 2**20:+.1f} MiB)  "
              f"trim+regenerate same: {r.get('trim_same_tokens')}  {s[-1]['seconds']:.0f} s", flush=True)
        del model
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
