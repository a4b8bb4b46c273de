"""velox-generate: mlx_lm.generate's main flags, with the folder's compressed KV caches.

Prompt-cache files follow mlx_lm: ``--save-prompt-cache FILE`` processes the prompt and
saves the cache (as ``mlx_lm.cache_prompt``; with a chat template the user turn is left
open), ``--prompt-cache-file FILE`` continues from it with the prompt as the rest of that
turn (as ``mlx_lm.generate --prompt-cache-file``). Files are written by mlx_lm's
``save_prompt_cache`` and read by ``velox.runtime.loader.load_prompt_cache``, which
attaches the folder's codecs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    p.add_argument("--prompt-cache-file", default=None,
                   help="continue from a prompt cache saved by --save-prompt-cache (the prompt is the rest of "
                        "the cached user turn)")
    p.add_argument("--save-prompt-cache", metavar="FILE", default=None,
                   help="process the prompt, save the KV cache to FILE (.safetensors) and exit")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="compute dtype (auto: float32 on MLX's CPU backend, the model's own elsewhere)")
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        reexec_with_openblas()
    args = build_parser().parse_args(argv)
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache, save_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    from ..format import VeloxFormatError
    from .loader import load, load_prompt_cache

    try:
        metadata = read_prompt_cache_metadata(args.prompt_cache_file) if args.prompt_cache_file else {}
        if metadata.get("model") and not same_model(metadata["model"], args.model):
            raise ValueError(f"{args.prompt_cache_file} was made with {metadata['model']}, not {args.model}")
        # A file saved with a non-default method continues with that method unless --kv says otherwise.
        model, tokenizer = load(args.model, kv=args.kv or metadata.get("kv"))
        cache = (load_prompt_cache(args.prompt_cache_file, model) if args.prompt_cache_file
                 else make_prompt_cache(model))
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
    tokens = encode_prompt(tokenizer, prompt, args, continuing=bool(args.prompt_cache_file))
    if args.save_prompt_cache:
        for _ in generate_step(mx.array(tokens), model, max_tokens=0, prompt_cache=cache):
            pass
        method = next((c.method for c in cache if hasattr(c, "method")), "")
        save_prompt_cache(args.save_prompt_cache, cache, {"model": str(args.model), "kv": method})
        print(f"saved {len(tokens)} prompt tokens to {args.save_prompt_cache} ({kv_bytes(cache)[0] / 1e6:.3f} MB of KV)")
        return 0
    sampler = make_sampler(args.temp, args.top_p)
    response = None
    for response in stream_generate(model, tokenizer, tokens, max_tokens=args.max_tokens,
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


def encode_prompt(tokenizer, prompt: str, args, continuing: bool = False) -> list[int]:
    """Prompt tokens, as mlx_lm.generate / mlx_lm.cache_prompt make them.

    With a chat template, a prompt to be saved leaves the user turn open, and a prompt
    that continues a saved one is only what follows the turn's opening (everything the
    template puts before the content is already in the cache).
    """
    if args.ignore_chat_template or tokenizer.chat_template is None:
        return tokenizer.encode(prompt, add_special_tokens=not continuing)
    messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    messages.append({"role": "user", "content": prompt})
    saving = bool(args.save_prompt_cache)
    template = dict(tokenize=False, add_generation_prompt=not saving, continue_final_message=saving)
    text = tokenizer.apply_chat_template(messages, **template)
    if continuing:
        messages[-1]["content"] = "<query>"
        text = text[tokenizer.apply_chat_template(messages, **template).index("<query>"):]
    return tokenizer.encode(text, add_special_tokens=False)


def read_prompt_cache_metadata(path: str) -> dict:
    """The metadata dict of a prompt-cache file (mlx_lm stores it flattened as ``0.<key>``)."""
    import mlx.core as mx

    if not Path(path).exists():
        raise FileNotFoundError(f"no prompt-cache file {path}")
    _, meta = mx.load(str(path), return_metadata=True)
    return {k[2:]: v for k, v in meta.items() if k.startswith("0.")}


def same_model(a: str, b: str) -> bool:
    """Whether two --model values name the same model (local folders compared resolved)."""
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def kv_bytes(cache: list) -> tuple[int, int]:
    """(bytes the caches hold, bytes mlx_lm's fp16 KVCache would hold for the same tokens)."""
    held = sum(c.nbytes for c in cache)
    return held, sum(getattr(c, "fp16_nbytes", c.nbytes) for c in cache)


if __name__ == "__main__":
    sys.exit(main())
