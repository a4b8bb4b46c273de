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

``--model FOLDER`` times a converted folder instead (the table of record on the CPU): the model's
own fp16 KVCache and every method the folder holds, each prefilled once per context, then decode
steps taken alternately (fp16, method 1, method 2, …, fp16, …) in one process, so a change in the
machine's speed shows in every column alike.

    python scripts/bench_decode.py --model out/smollm2-kv --contexts 4096,8192 --tokens 16
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


def prefill(model, cache: list, prompt: mx.array) -> tuple[mx.array, int]:
    """Prefill ``prompt [1, S]`` in chunks -> (the greedy next token [1], peak MLX memory in bytes
    above what was held before: the cache and the prefill's transients, whatever other caches
    are alive)."""
    mx.clear_cache()
    mx.reset_peak_memory()
    held = mx.get_active_memory()
    for a in range(0, prompt.shape[1], PREFILL_CHUNK):
        logits = model(prompt[:, a:a + PREFILL_CHUNK], cache=cache)
        mx.eval(logits)
    return mx.argmax(logits[:, -1], axis=-1), mx.get_peak_memory() - held


def bench_folder(args) -> None:
    """The --model table: fp16 KVCache and each method of the folder, decode steps alternated."""
    import mlx_lm

    from velox.cpu import float32_on_cpu
    from velox.runtime.layers import native_caches
    from velox.runtime.loader import cache_factory, read_kv_quant

    model, _ = mlx_lm.load(args.model)
    float32_on_cpu(model)
    kvq = read_kv_quant(Path(args.model))
    methods = list(kvq["methods"]) if args.methods is None else args.methods.split(",")
    factories = {"fp16": lambda: native_caches(model)}
    for m in methods:
        factories[m] = cache_factory(model, Path(args.model), kvq, m, fast=True)[1]
    attention.install()
    vocab = model.args.vocab_size
    print(f"device: {mx.default_device()}, mlx {mx.__version__}, model {args.model} ({len(model.layers)} layers), "
          f"float32 on the CPU, {args.tokens} decode steps per cache, alternated")
    print()
    print("| context | " + " | ".join(f"{k} tok/s" for k in factories) + " | "
          + " | ".join(f"{m} ÷ fp16" for m in methods) + " | prefill peak MiB above the weights (" + " / ".join(factories)
          + ") |")
    print("|---:|" + "---:|" * (2 * len(factories)))
    for S in (int(c) for c in args.contexts.split(",")):
        prompt = mx.random.randint(0, vocab, (1, S), key=mx.random.key(1))
        state, peaks = {}, {}
        for name, make in factories.items():
            cache = make()
            tok, peaks[name] = prefill(model, cache, prompt)
            state[name] = [cache, tok]
        times = {name: [] for name in factories}
        for _ in range(args.tokens):
            for name, st in state.items():
                start = time.perf_counter()
                logits = model(st[1][:, None], cache=st[0])
                st[1] = mx.argmax(logits[:, -1], axis=-1)
                mx.eval(st[1])
                times[name].append(time.perf_counter() - start)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(f"| {S} | " + " | ".join(f"{1 / med[k]:.2f}" for k in factories) + " | "
              + " | ".join(f"{med['fp16'] / med[m]:.2f}" for m in methods) + " | "
              + " / ".join(f"{peaks[k] / 2**20:.0f}" for k in factories) + " |", flush=True)
        del state


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
    ap.add_argument("--model", default=None, help="a converted velox folder: time its methods against fp16")
    ap.add_argument("--methods", default=None, help="with --model: these methods (default: all the folder holds)")
    args = ap.parse_args(argv)
    on_cpu = mx.default_device() == mx.cpu
    if on_cpu:
        reexec_with_openblas()
    if args.model:
        bench_folder(args)
        return 0
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
