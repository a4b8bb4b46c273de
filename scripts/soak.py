"""Soak: generate many tokens through each velox cache of a folder, watching memory.

Every ``--every`` tokens it records the cache's bytes (``cache.nbytes``, measured from its
arrays) and the process RSS. A healthy cache grows its bytes linearly at its bytes per
token and RSS stays flat apart from that growth (no leak, no quadratic copies). At the
end it trims ``--trim`` tokens off the cache and re-generates them: greedy decoding must
give the same tokens as the first pass.

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


def step(model, token: int, cache: list) -> int:
    """One greedy decode step -> the next token."""
    logits = model(mx.array([[token]]), cache=cache)
    nxt = mx.argmax(logits[0, -1]).item()
    return int(nxt)


def soak(model, prompt: list[int], tokens: int, every: int, trim: int) -> dict:
    """Generate ``tokens`` greedily after ``prompt``; samples every ``every`` tokens, then the trim check."""
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)
    token = int(mx.argmax(logits[0, -1]).item())
    out, samples = [token], []
    start = time.perf_counter()
    for i in range(1, tokens + 1):
        token = step(model, token, cache)
        out.append(token)
        if i % every == 0 or i == tokens:
            mx.clear_cache()  # freed buffers MLX keeps for reuse are not a leak
            samples.append({"tokens": cache[0].offset, "cache_bytes": sum(c.nbytes for c in cache),
                            "rss_bytes": rss_bytes(), "seconds": round(time.perf_counter() - start, 2)})
    result = {"samples": samples}
    if trim and all(c.is_trimmable() for c in cache):
        # out[k] was produced after feeding out[k-1]; drop the last `trim` fed tokens and redo them.
        for c in cache:
            c.trim(trim)
        token, again = out[-trim - 2], []
        for _ in range(trim):
            token = step(model, token, cache)
            again.append(token)
        result["trim_tokens"] = trim
        result["trim_same_tokens"] = again == out[-trim - 1:-1]
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
    parser.add_argument("--prompt", default="The history of the Python language")
    parser.add_argument("--json", default=None, help="write the samples here")
    args = parser.parse_args(argv)
    reexec_with_openblas()

    methods = args.kv.split(",") if args.kv else list(read_kv_quant(Path(args.model))["methods"])
    report = {}
    for method in methods:
        model, tok = velox.load(args.model, kv=method)
        r = soak(model, tok.encode(args.prompt), args.tokens, args.every, args.trim)
        s = r["samples"]
        r["cache_bytes_per_token"] = round(slope(s, "cache_bytes"), 2)
        r["rss_growth_minus_cache"] = (s[-1]["rss_bytes"] - s[0]["rss_bytes"]) - (s[-1]["cache_bytes"] - s[0]["cache_bytes"])
        report[method] = r
        print(f"{method:16s} {s[-1]['tokens']:7d} tokens  cache {s[-1]['cache_bytes'] / 2**20:8.2f} MiB "
              f"({r['cache_bytes_per_token']:.1f} B/token)  RSS {s[-1]['rss_bytes'] / 2**20:8.1f} MiB "
              f"(growth beyond cache {r['rss_growth_minus_cache'] / 2**20:+.1f} MiB)  "
              f"trim+regenerate same: {r.get('trim_same_tokens')}  {s[-1]['seconds']:.0f} s", flush=True)
        del model
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
