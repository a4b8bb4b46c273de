"""End-to-end decode speed: a model with mlx_lm's own KV cache and its 4-bit QuantizedKVCache
against the same model with velox turboquant_mse caches on the compressed-domain fast path,
at several contexts.

Random weights (speed does not depend on them), mlx_lm's llama module; the default shape is
small enough for a CPU (``--hidden 1024 --layers 8 --heads 16 --kv-heads 4 --head-dim 64``).
The prompt of each context is prefilled in chunks, then ``--tokens`` greedy tokens are timed
two ways: one step (one eval) at a time, the median step giving tok/s; and through
``mlx_lm.generate.generate_step`` (what ``mlx_lm.generate`` runs: the next step's graph is built
while the GPU computes this one), the mean over the tokens.

    python scripts/bench_decode.py --contexts 1024,4096 --tokens 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache  # noqa: E402

from velox.cpu import reexec_with_openblas  # noqa: E402
from velox.methods import turboquant_mse  # noqa: E402
from velox.runtime import attention  # noqa: E402
from velox.runtime.cache import VeloxKVCache  # noqa: E402

PREFILL_CHUNK = 2048  # mlx_lm.generate's default prefill_step_size


def build_model(args, dtype: mx.Dtype) -> llama.Model:
    config = dict(model_type="llama", hidden_size=args.hidden, num_hidden_layers=args.layers,
                  intermediate_size=2 * args.hidden, num_attention_heads=args.heads,
                  num_key_value_heads=args.kv_heads, head_dim=args.head_dim, rms_norm_eps=1e-5,
                  vocab_size=32000, rope_theta=500000.0, tie_word_embeddings=True,
                  max_position_embeddings=1 << 17)
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def velox_cache(model, bits: int) -> list:
    """One turboquant_mse VeloxKVCache (fast path) per layer."""
    a = model.args
    return [VeloxKVCache(turboquant_mse.make_codec(a.num_key_value_heads, a.head_dim, bits, 2 * i),
                         turboquant_mse.make_codec(a.num_key_value_heads, a.head_dim, bits, 2 * i + 1),
                         method="turboquant_mse", fast=True)
            for i in range(len(model.layers))]


def decode_seconds(model, cache: list, context: int, tokens: int) -> tuple[float, float, int]:
    """Prefill ``context`` random tokens, then time greedy decode steps -> (median seconds of
    one step evaluated alone, mean seconds per token under generate_step, peak MLX memory during
    the prefill in bytes)."""
    prompt = mx.random.randint(0, 32000, (1, context), key=mx.random.key(1))
    mx.eval(prompt)
    mx.clear_cache()
    mx.reset_peak_memory()
    for a in range(0, context, PREFILL_CHUNK):
        logits = model(prompt[:, a:a + PREFILL_CHUNK], cache=cache)
        mx.eval(logits)
    peak = mx.get_peak_memory()
    tok = mx.argmax(logits[:, -1], axis=-1)
    times = []
    for _ in range(tokens):
        start = time.perf_counter()
        logits = model(tok[:, None], cache=cache)
        tok = mx.argmax(logits[:, -1], axis=-1)
        mx.eval(tok)
        times.append(time.perf_counter() - start)
    steps = generate_step(tok, model, prompt_cache=cache, max_tokens=tokens + 1)
    next(steps)  # the first token (its one-token "prompt" pass)
    start = time.perf_counter()
    for _ in steps:
        pass
    return sorted(times)[len(times) // 2], (time.perf_counter() - start) / tokens, peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default=None, help="model dtype (default: float32 on CPU, float16 on GPU)")
    args = ap.parse_args(argv)
    on_cpu = mx.default_device() == mx.cpu
    if on_cpu:
        reexec_with_openblas()
    dtype = getattr(mx, args.dtype) if args.dtype else (mx.float32 if on_cpu else mx.float16)
    model = build_model(args, dtype)
    attention.install()

    print(f"device: {mx.default_device()}, mlx {mx.__version__}, dtype {dtype}, llama {args.layers} layers, "
          f"hidden {args.hidden}, {args.heads} query heads / {args.kv_heads} KV heads / head_dim {args.head_dim}, "
          f"{args.tokens} decode steps each way")
    print()
    print(f"| context | mlx_lm KVCache tok/s (step / generate) | mlx_lm QuantizedKVCache {args.bits}-bit tok/s "
          f"| velox turboquant_mse {args.bits}/{args.bits} fast path tok/s (step / generate) "
          f"| velox ÷ KVCache (step / generate) | prefill peak MiB (KVCache / quantized / velox) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for S in (int(c) for c in args.contexts.split(",")):
        # One cache at a time (each made when its run starts), so a peak never includes another's cache.
        makers = (lambda: make_prompt_cache(model),
                  lambda: [QuantizedKVCache(group_size=64, bits=args.bits) for _ in model.layers],
                  lambda: velox_cache(model, args.bits))
        runs = []
        for make in makers:
            try:
                runs.append(decode_seconds(model, make(), S, args.tokens))
            except RuntimeError as e:  # MLX's CUDA backend lacks some quantized_matmul shapes
                print(f"<!-- {e} -->")
                runs.append(None)
        (native, native_gen, pn), (velox, velox_gen, pv) = runs[0], runs[2]
        q = f"{1 / runs[1][0]:.1f} / {1 / runs[1][1]:.1f}" if runs[1] else "n/a"
        pq = f"{runs[1][2] / 2**20:.0f}" if runs[1] else "n/a"
        print(f"| {S} | {1 / native:.1f} / {1 / native_gen:.1f} | {q} | {1 / velox:.1f} / {1 / velox_gen:.1f} "
              f"| {native / velox:.2f} / {native_gen / velox_gen:.2f} | {pn / 2**20:.0f} / {pq} / {pv / 2**20:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
