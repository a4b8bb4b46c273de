"""What bounds the fused decode kernel: its GPU time against edited copies of itself (CUDA only).

Each variant compiles ``velox/kernels/source.py``'s decode body with one edit and times one
decode step over a Llama-3-8B-shaped random cache (turboquant_mse 4/4 bits), all in one
process, next to fp16 ``mx.fast.scaled_dot_product_attention``. Times are µs per call,
pipelined / each batch of calls evaluated on its own (``bench_attention.py``'s two columns);
the pipelined one is the GPU's time wherever building the calls is the shorter. ``err``: the
largest difference from the first variant's output, relative to its largest value.

Variants (some give wrong results on purpose, to time what is left):
  plain         the kernel as it is
  pft1, pft4    1 or 4 tiles' loads in flight per warp instead of 2
  tb132, tb528  fewer, longer or more, shorter blocks (FusedDecode's target_blocks)
  nolut         no table lookups (the code itself stands in for its level): wrong results
  nomma         no mma instructions (an XOR of the fragments instead): wrong results
  loads         neither: what loading and unpacking the codes alone costs
  earlyk        the first key tiles start loading before the tables, not after the query rotation
  empty         the kernel returns at once: what a launch costs with these inputs and this grid,
                the CPU's share of a call (wrong results)
  file:PATH     the kernel of another copy of source.py (e.g. ``git show REV:velox/kernels/source.py``)
                with the same inputs and outputs as this one (from session 9 on: a scratch input,
                two outputs)

    python3 scripts/kernel_variants.py --variants plain,pft1,pft4,tb132,tb528,nolut,nomma,loads
    git show a97af77:velox/kernels/source.py > /tmp/old.py
    python3 scripts/kernel_variants.py --variants file:/tmp/old.py,plain --contexts 32768,65536
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from velox.kernels import fused, source  # noqa: E402
from velox.methods import turboquant_mse  # noqa: E402
from velox.runtime.cache import VeloxKVCache  # noqa: E402

HQ, HKV, D = 32, 8, 128
# (variant, text of the body or header, what replaces it)
PFT = "constexpr int PFT = T / 64 < 2 ? T / 64 : 2;"
LOOKUP = "    #define VX_HLW(tab, SH, NL, d, wd, j, BITS) (SH ? \\"
MMA = '    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32'
EDITS = {
    "pft1": [(PFT, "constexpr int PFT = 1;")],
    "pft4": [(PFT, "constexpr int PFT = T / 64 < 4 ? T / 64 : 4;")],
    "nolut": [(LOOKUP, "    #define VX_HLW(tab, SH, NL, d, wd, j, BITS) ((wd)[(j) * (BITS) / 32] + (unsigned int)(d))\n"
                       "    #define VX_HLW_UNUSED(tab, SH, NL, d, wd, j, BITS) (SH ? \\")],
    "nomma": [(MMA, "    d[0] += __uint_as_float((a[0] ^ a[1] ^ a[2] ^ a[3] ^ b[0] ^ b[1]) & 0x007fffffu);\n"
                    "    if (false) asm(\"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32")],
}
EDITS["loads"] = EDITS["nolut"] + EDITS["nomma"]
KSTART = "    VX_START_TILES(kw, kn, kring, knring, KWC, WK, c * KWC, 2, g + 8 * u_);\n"
LANE4 = "    const unsigned int lane4 = (unsigned int)lane << 2;\n"
KRING = "    float knring[PFT][2];\n"
EDITS["earlyk"] = [(LANE4 + KSTART, LANE4), (KRING, KRING + KSTART)]  # the first key tiles load before the tables
EDITS["empty"] = [("    const float NEG_INF = VX_NEG_INF;", "    if (VX_THREAD_IDX >= 0) return;\n    const float NEG_INF = VX_NEG_INF;")]
TARGET_BLOCKS = {"tb132": 132, "tb528": 528}


def render(variant: str) -> tuple[str, str]:
    """(header, body) of the decode kernel for CUDA with the variant's edits (not compacted)."""
    if variant.startswith("file:"):
        spec = importlib.util.spec_from_file_location("velox_source_copy", variant[5:])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        header, body = module.render("decode", "cuda")
    else:
        header, body = source.render("decode", "cuda")
    for old, new in EDITS.get(variant, []):
        if old not in header + body:
            raise SystemExit(f"{variant}: the kernel changed, no {old!r} to edit")
        header, body = header.replace(old, new, 1), body.replace(old, new, 1)
    return header, body


class VariantDecode(fused.FusedDecode):
    """FusedDecode compiling a variant of the decode kernel."""

    def __init__(self, variant: str):
        super().__init__("cuda", ps_budget=4096, target_blocks=TARGET_BLOCKS.get(variant, 264), smem_words=12288)
        self.variant = variant
        self.name_suffix = "_" + "".join(ch if ch.isalnum() else "_" for ch in variant)

    def _source(self, name: str) -> tuple[str, str]:
        return render(self.variant) if name == "decode" else super()._source(name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="plain,pft1,pft4,tb132,tb528,nolut,nomma,loads")
    ap.add_argument("--contexts", default="32768,65536,131072")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "scripts" / "bench_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    names = args.variants.split(",")
    for name in names:
        render(name)  # an edit that no longer applies stops here, before any timing
    variants = {name: VariantDecode(name) for name in names}
    print(f"device: {mx.default_device()}, mlx {mx.__version__}, {HQ}/{HKV} heads × {D}, turboquant_mse 4/4, "
          "µs per call: pipelined / each batch evaluated alone")
    for S in (int(c) for c in args.contexts.split(",")):
        cache = VeloxKVCache(turboquant_mse.make_codec(HKV, D, 4, 0), turboquant_mse.make_codec(HKV, D, 4, 1))
        keys, values = mx.random.normal((1, HKV, S, D)), mx.random.normal((1, HKV, S, D))
        cache.update_and_fetch(keys, values)
        k16, v16 = keys.astype(mx.float16), values.astype(mx.float16)
        q = mx.random.normal((1, HQ, 1, D)).astype(mx.float16)
        mx.eval(cache.keys, cache.values, k16, v16, q)
        del keys, values
        kv = cache.compressed()
        sdpa = lambda: mx.fast.scaled_dot_product_attention(q, k16, v16, scale=D**-0.5, mask=None)
        row = [f"context {S}: fp16 SDPA {bench.pipelined_seconds(sdpa, args.iters, 10) * 1e6:.1f} / "
               f"{bench.median_seconds(sdpa, args.iters // 2, 10) * 1e6:.1f}"]
        first = None
        for name, decoder in variants.items():
            call = lambda: decoder.decode(q, kv, D**-0.5)
            out = call().astype(mx.float32)
            first = out if first is None else first
            err = (mx.max(mx.abs(out - first)) / mx.max(mx.abs(first))).item()
            row.append(f"{name} {bench.pipelined_seconds(call, args.iters, 10) * 1e6:.1f} / "
                       f"{bench.median_seconds(call, args.iters // 2, 10) * 1e6:.1f} "
                       f"(T={decoder.tokens_per_block(S, HKV, HQ // HKV)}, err {err:.0e})")
        print(" | ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
