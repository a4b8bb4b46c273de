"""velox-generate: mlx_lm.generate's main flags, with the folder's compressed KV caches."""

from __future__ import annotations

import argparse
import sys

from ..cpu import float32_on_cpu, reexec_with_openblas


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="velox-generate",
                                description="Generate text with a velox model folder (compressed KV cache).")
    p.add_argument("--model", required=True, help="velox folder or Hugging Face repo id")
    p.add_argument("--kv", default=None, help="calibrated method to use (default: the folder's default)")
    p.add_argument("--prompt", "-p", default="Hello", help="prompt ('-' reads stdin)")
    p.add_argument("--system-prompt", default=None, help="system prompt for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true", help="use the raw prompt")
    p.add_argument("--max-tokens", "-m", type=int, default=100, help="tokens to generate (default: 100)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="compute dtype (auto: float32 on MLX's CPU backend, the model's own elsewhere)")
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        reexec_with_openblas()
    args = build_parser().parse_args(argv)
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    from ..format import VeloxFormatError
    from .loader import load

    try:
        model, tokenizer = load(args.model, kv=args.kv)
    except (VeloxFormatError, ValueError, FileNotFoundError) as e:
        print(f"velox-generate: error: {e}", file=sys.stderr)
        return 2
    if args.dtype == "auto":
        float32_on_cpu(model)
    else:
        model.set_dtype(getattr(mx, args.dtype))
    if args.seed is not None:
        mx.random.seed(args.seed)

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not args.ignore_chat_template and tokenizer.chat_template is not None:
        messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt else [])
        messages.append({"role": "user", "content": prompt})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    cache = make_prompt_cache(model)
    sampler = make_sampler(args.temp, args.top_p)
    response = None
    for response in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens,
                                    sampler=sampler, prompt_cache=cache):
        print(response.text, end="", flush=True)
    print()
    if response is not None:
        held, fp16 = kv_bytes(cache)
        print("=" * 10)
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens-per-sec")
        print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.1f} tokens-per-sec")
        print(f"KV cache: {held / 1e6:.3f} MB held vs {fp16 / 1e6:.3f} MB for an fp16 cache of the same "
              f"tokens ({fp16 / max(held, 1):.1f}x smaller)")
    return 0


def kv_bytes(cache: list) -> tuple[int, int]:
    """(bytes the caches hold, bytes mlx_lm's fp16 KVCache would hold for the same tokens)."""
    held = sum(c.nbytes for c in cache)
    return held, sum(getattr(c, "fp16_nbytes", c.nbytes) for c in cache)


if __name__ == "__main__":
    sys.exit(main())
