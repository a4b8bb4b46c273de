"""Per-step decode attention: full-precision SDPA, mlx_lm's 4-bit quantized attention,
velox decode-everything and velox's compressed-domain fast path, in one run.

``--kv`` picks the velox method (turboquant_mse by default). Calibrated methods (spectral,
vecinfer, rabitq, commvq; ``spectral[basis=pairs]`` for the pair basis) are calibrated here on
random anisotropic pre-RoPE keys under Llama-3's RoPE (speed does not depend on the data);
``--mixed`` codes half the KV heads at bits − 1 and half at
bits + 1 (RateQuant's per-head widths, HeadGroupCodec), the same average.

Llama-3-8B-shaped attention (32 query heads, 8 KV heads, head_dim 128), one query
token, random data (speed does not depend on the values). On MLX's CPU backend the
model computes in float32, so the full-precision baseline holds float32 K/V there;
``--dtype float16`` to compare against fp16 K/V instead.

    python scripts/bench_attention.py --contexts 1024,4096,8192
    python scripts/bench_attention.py --contexts 4096 --kv qjl --mixed

"time/step" evaluates every batch of calls on its own; "pipelined" builds the next batch
while the device runs the last, as ``mlx_lm.generate`` does (``pipelined_seconds``).

Bytes read per step are the arrays attention must read: K and V for SDPA, codes +
scales + biases for mlx_lm, codes + fp16 norms for velox (decode-everything reads the
same codes, then writes and re-reads the decoded fp32 history).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.rope_utils import initialize_rope

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_lm.models.base import quantized_scaled_dot_product_attention  # noqa: E402

from velox import kernels  # noqa: E402
from velox.cpu import reexec_with_openblas  # noqa: E402
from velox.methods import get_method, parse_method_options, ratequant  # noqa: E402
from velox.methods.base import LayerActivations, LayerSpec  # noqa: E402
from velox.runtime.cache import VeloxKVCache  # noqa: E402

HQ, HKV, D = 32, 8, 128


def median_seconds(fn, iters: int, reps: int, warmup: int = 3) -> float:
    """Median seconds per call over ``iters`` timings of ``reps`` calls evaluated together:
    a model's decode step queues every layer's attention before one eval, so the per-eval
    synchronisation (~50 µs on MLX's CUDA backend) is spread over many calls there too."""
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        mx.eval([fn() for _ in range(reps)])
        times.append((time.perf_counter() - start) / reps)
    return sorted(times)[len(times) // 2]


def pipelined_seconds(fn, iters: int, reps: int) -> float:
    """Seconds per call when the next ``reps`` calls are built while the device runs the last
    ones (``mx.async_eval``), as ``mlx_lm.generate``'s decode loop overlaps building a step with
    running the previous one: the device's time per call wherever building is the shorter."""
    pending = [fn() for _ in range(reps)]
    mx.async_eval(pending)
    start = time.perf_counter()
    for _ in range(iters):
        nxt = [fn() for _ in range(reps)]
        mx.async_eval(nxt)
        mx.eval(pending)
        pending = nxt
    mx.eval(pending)
    return (time.perf_counter() - start) / ((iters + 1) * reps)


def copy_bandwidth(reps: int) -> float:
    """Device copy bandwidth in bytes/s (bytes read + written by x + 1 over 1 GiB)."""
    x = mx.zeros((1 << 28,), dtype=mx.float32)
    mx.eval(x)
    return 2 * x.nbytes / median_seconds(lambda: x + 1, 10, reps)


def nbytes(arrays) -> int:
    return sum(a.nbytes for a in arrays)


def random_activations(tokens: int = 1024) -> LayerActivations:
    """Anisotropic random calibration activations (pre-RoPE keys as given, positions 0..)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((tokens, HKV, D)) * np.linspace(3, 0.2, D)).astype(np.float32)
    return LayerActivations(keys=x, keys_pre_rope=x, values=x, positions=np.arange(tokens),
                            queries=rng.standard_normal((tokens, HQ, D)).astype(np.float32))


def make_codecs(method: str, key_bits: int, value_bits: int, mixed: bool) -> tuple:
    """(key codec, value codec) of a method for HKV heads of D, calibrated methods on
    ``random_activations``; mixed (data-free methods): heads alternate between bits − 1 and
    bits + 1 (HeadGroupCodecs)."""
    name, options = parse_method_options(method)
    module = get_method(name)
    if hasattr(module, "calibrate"):
        rope = initialize_rope(D, 500000.0, False, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                               131072)
        spec = LayerSpec(0, HKV, D, key_bits, value_bits, rope=rope)
        return module.make_codecs(module.calibrate(random_activations(), spec, **options), spec)
    if not mixed:
        return module.make_codecs({}, LayerSpec(0, HKV, D, key_bits, value_bits))
    widths = lambda b: [b - 1, b + 1] * (HKV // 2)
    return ratequant.make_mixed_codecs(module, {}, LayerSpec(0, HKV, D, 0, 0), widths(key_bits), widths(value_bits))


def bench_context(S: int, dtype: mx.Dtype, method: str, key_bits: int, value_bits: int, mixed: bool,
                  iters: int, reps: int) -> list[dict]:
    """One row per attention: {"method", "seconds", "bytes"} for one decode step at context S."""
    keys = mx.random.normal((1, HKV, S, D), key=mx.random.key(1))
    values = mx.random.normal((1, HKV, S, D), key=mx.random.key(2))
    q = mx.random.normal((1, HQ, 1, D), key=mx.random.key(3)).astype(dtype)
    scale = D**-0.5
    k_full, v_full = keys.astype(dtype), values.astype(dtype)
    qk, qv = mx.quantize(k_full, group_size=64, bits=4), mx.quantize(v_full, group_size=64, bits=4)
    cache = VeloxKVCache(*make_codecs(method, key_bits, value_bits, mixed), method=method)
    label = f"{method} {key_bits}/{value_bits}" + (" ±1 per head" if mixed else "")
    cache.update_and_fetch(keys, values)  # encodes (fast=False: the cache decodes on fetch)
    mx.eval(k_full, v_full, qk, qv, cache.keys, cache.values)
    coded = cache.compressed()
    velox_bytes = coded.coded_nbytes

    def decode_everything():
        k, v = cache.fetch(dtype)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=None)

    cases = [
        (f"{'fp16' if dtype == mx.float16 else str(dtype).split('.')[-1]} mx.fast.scaled_dot_product_attention",
         lambda: mx.fast.scaled_dot_product_attention(q, k_full, v_full, scale=scale, mask=None),
         k_full.nbytes + v_full.nbytes),
        ("mlx_lm QuantizedKVCache 4-bit (group 64)",
         lambda: quantized_scaled_dot_product_attention(q, qk, qv, scale=scale, mask=None, group_size=64, bits=4),
         nbytes(qk + qv)),
        (f"velox {label}, decode everything", decode_everything, velox_bytes),
        (f"velox {label}, fast path ({kernels.backend()})",
         lambda: kernels.attend(q, cache.compressed(), scale=scale, mask=None), velox_bytes),
    ]
    return [{"method": name, "seconds": median_seconds(fn, iters, reps), "pipelined": pipelined_seconds(fn, iters, reps),
             "bytes": b} for name, fn, b in cases]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="1024,4096,8192")
    ap.add_argument("--dtype", default=None, help="K/V/query dtype (default: float32 on CPU, float16 on GPU)")
    ap.add_argument("--kv", default="turboquant_mse", help="velox method, e.g. rabitq or spectral[basis=pairs]")
    ap.add_argument("--mixed", action="store_true", help="per-head widths bits ± 1 (RateQuant's HeadGroupCodec)")
    ap.add_argument("--key-bits", type=int, default=None, help="default: the method's")
    ap.add_argument("--value-bits", type=int, default=None, help="default: the method's")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=10, help="calls per timed eval (see median_seconds)")
    args = ap.parse_args(argv)
    on_cpu = mx.default_device() == mx.cpu
    if on_cpu:
        reexec_with_openblas()
    dtype = getattr(mx, args.dtype) if args.dtype else (mx.float32 if on_cpu else mx.float16)
    module = get_method(parse_method_options(args.kv)[0])
    key_bits = args.key_bits or module.DEFAULT_KEY_BITS
    value_bits = args.value_bits or module.DEFAULT_VALUE_BITS

    print(f"device: {mx.default_device()}, mlx {mx.__version__}, dtype {dtype}, "
          f"{HQ} query heads / {HKV} KV heads / head_dim {D}, batch 1, one query token, "
          f"median of {args.iters} timings of {args.reps} calls each")
    if not on_cpu:
        print(f"device copy bandwidth (read + write): {copy_bandwidth(args.reps) / 1e9:.0f} GB/s")
    print()
    print("| context | attention | time/step | × full precision | pipelined time/step | × full precision "
          "| bytes read/step | bytes ÷ time |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for S in (int(c) for c in args.contexts.split(",")):
        rows = bench_context(S, dtype, args.kv, key_bits, value_bits, args.mixed, args.iters, args.reps)
        ref, ref_p = rows[0]["seconds"], rows[0]["pipelined"]
        for r in rows:
            t, tp = r["seconds"], r["pipelined"]
            print(f"| {S} | {r['method']} | {t * 1e6:.1f} µs | {t / ref:.2f} | {tp * 1e6:.1f} µs | {tp / ref_p:.2f} "
                  f"| {r['bytes'] / 2**20:.2f} MiB | {r['bytes'] / t / 1e9:.1f} GB/s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
