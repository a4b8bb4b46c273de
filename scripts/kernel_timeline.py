"""Where the fused decode kernel's GPU time goes: per-block phase timestamps (CUDA only).

Instruments ``velox/kernels/source.py``'s decode body with ``globaltimer`` reads at its phase
boundaries (block start, level tables, query rotation, scores, softmax statistics, values,
counter, merge, output), runs one decode step over a Llama-3-8B-shaped random cache, and prints
the kernel span, when blocks started, and the median and maximum time of each phase per block.
``--chained N`` launches N decode steps in one eval (as a model's layers queue) and prints each
launch's span and the GPU's idle gap before the next.

The timers cost registers: the instrumented kernel used 154 per thread against the plain one's
114 (NVRTC, sm_90, 4/4 bits), three blocks per SM instead of four, so at 64k (512 blocks) about
a fifth of its blocks start in a second wave that the plain kernel does not have.

    python3 scripts/kernel_timeline.py --contexts 1024,65536
    python3 scripts/kernel_timeline.py --contexts 1024,65536 --chained 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from velox.kernels import fused, source  # noqa: E402
from velox.methods import turboquant_mse  # noqa: E402
from velox.runtime.cache import VeloxKVCache  # noqa: E402

HQ, HKV, D = 32, 8, 128
# (phase that ends here, text of the body the timestamp goes before)
MARKS = [
    ("tables", "    // 0. the group's query rows"),
    ("query rotation", "    VX_BARRIER();\n\n    // code j of this thread's words wd"),
    ("scores", "    // 2. softmax statistics"),
    ("softmax statistics", "    // 3. values:"),
    ("values", "    // 4. the merge"),
    ("counter", "    if (!*last_block) return;"),
    ("merge", "    VX_BARRIER();\n    if (FINISH) {"),
]
PHASES = [name for name, _ in MARKS] + ["output"]
TICK = ("#define VX_TICK(k) do { if (VX_THREAD_IDX == 0) { unsigned long long t_; "
        "asm volatile(\"mov.u64 %0, %%globaltimer;\" : \"=l\"(t_)); ticks[tick_row * 9 + (k)] = t_; } } while (0)\n")


def instrumented_body() -> str:
    """The decode body with VX_TICK(k) at the phase boundaries (ticks: an extra uint64 output)."""
    anchor = "    const int t0 = new_token ? coded - 1 : split * T;"
    body = source.DECODE.replace(anchor, anchor + "\n"
                                 "    const size_t tick_row = ((size_t)b * n_kv + h) * n_split + split;\n"
                                 "    VX_TICK(0);", 1)
    for k, (_, anchor) in enumerate(MARKS, start=1):
        if anchor not in body:
            raise SystemExit(f"the decode body changed: no {anchor!r} to time")
        body = body.replace(anchor, f"    VX_TICK({k});\n" + anchor, 1)
    # blocks that stop at a counter (either level of the merge) zero their last two ticks: every row is written, so the
    # output needs no init_value (a fill per launch, which would sit between chained launches)
    body = body.replace("    if (!*last_block) return;", "    if (!*last_block) {\n        if (VX_THREAD_IDX == 0) "
                        "{ ticks[tick_row * 9 + 7] = 0; ticks[tick_row * 9 + 8] = 0; }\n        return;\n    }")
    return body.rstrip() + "\n    VX_TICK(8);\n"


class TimedDecode(fused.FusedDecode):
    """FusedDecode whose kernel also returns ticks [blocks, 9] uint64 (nanoseconds; zeros where a
    block stopped early, i.e. past the counter for all but the last block of a head), one array
    per launch in ``ticks``."""

    name_suffix = "_timed"

    def _source(self, name: str) -> tuple[str, str]:
        if name != "decode":
            return super()._source(name)
        return source.render("decode", "cuda")[0] + TICK, source.CUDA.index + instrumented_body()

    def _outputs(self, name: str) -> list[str]:
        return super()._outputs(name) + (["ticks"] if name == "decode" else [])

    def kernel(self, name: str, template: tuple):
        k = super().kernel(name, template)
        if name != "decode":
            return k

        def call(**kw):
            gx, gy, gz = kw["grid"]
            kw["output_shapes"] = kw["output_shapes"] + [(gx // fused.THREADS * gy * gz * 9,)]
            kw["output_dtypes"] = kw["output_dtypes"] + [mx.uint64]
            outs = k(**kw)
            self.ticks.append(outs[-1])
            return outs[:-1]

        return call


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="1024,65536")
    ap.add_argument("--key-bits", type=int, default=4)
    ap.add_argument("--chained", type=int, default=0, help="also time N chained launches in one eval")
    args = ap.parse_args(argv)
    timed = TimedDecode("cuda", ps_budget=4096, target_blocks=264, smem_words=12288)
    timed.ticks = []
    for S in (int(c) for c in args.contexts.split(",")):
        cache = VeloxKVCache(turboquant_mse.make_codec(HKV, D, args.key_bits, 0),
                             turboquant_mse.make_codec(HKV, D, 4, 1), fast=True)
        cache.update_and_fetch(mx.random.normal((1, HKV, S, D)), mx.random.normal((1, HKV, S, D)))
        q = mx.random.normal((1, HQ, 1, D)).astype(mx.float16)
        kv = cache.compressed()
        for _ in range(5):  # the last of five runs (the first compiles)
            timed.ticks = []
            mx.eval(timed.decode(q, kv, D**-0.5), timed.ticks)
        t = np.array(timed.ticks[0]).reshape(-1, 9).astype(np.int64)
        t0 = t[:, 0].min()
        last = t[:, 8] > 0
        phases = np.diff(t[:, :7], axis=1) / 1e3
        print(f"context {S}, {args.key_bits}/4 bits: {len(t)} blocks of {timed.tokens_per_block(S, HKV, HQ // HKV)} "
              f"tokens, kernel span {(t[last, 8].max() - t0) / 1e3:.1f} µs (last counter {(t[:, 6].max() - t0) / 1e3:.1f} µs)")
        starts = (t[:, 0] - t0) / 1e3  # a late start: the block waited for a free slot (a second wave)
        print(f"  block starts: median {np.median(starts):.1f} µs, 90th percentile {np.percentile(starts, 90):.1f} µs, "
              f"max {starts.max():.1f} µs")
        for i, name in enumerate(PHASES[:6]):
            print(f"  {name:<20} median {np.median(phases[:, i]):6.2f} µs, max {phases[:, i].max():6.2f} µs per block")
        merge = (t[last, 7] - t[last, 6]) / 1e3
        output = (t[last, 8] - t[last, 7]) / 1e3
        print(f"  {'merge':<20} median {np.median(merge):6.2f} µs, max {merge.max():6.2f} µs (last blocks)")
        print(f"  {'output':<20} median {np.median(output):6.2f} µs, max {output.max():6.2f} µs (last blocks)")
        if args.chained:
            for _ in range(3):  # the last of three evals
                timed.ticks = []
                start = time.perf_counter()
                outs = [timed.decode(q, kv, D**-0.5) for _ in range(args.chained)]
                built = time.perf_counter()
                mx.eval(outs, timed.ticks)
                done = time.perf_counter()
            rows = [np.array(x).reshape(-1, 9).astype(np.int64) for x in timed.ticks]
            starts = np.array([r[:, 0].min() for r in rows])
            ends = np.array([r[:, 8].max() for r in rows])
            n = args.chained
            print(f"  {n} chained launches: build {(built - start) / n * 1e6:.1f} µs and eval "
                  f"{(done - built) / n * 1e6:.1f} µs per launch on the CPU; on the GPU, spans "
                  f"{np.round((ends - starts) / 1e3, 1).tolist()} µs, gaps {np.round((starts[1:] - ends[:-1]) / 1e3, 1).tolist()} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
