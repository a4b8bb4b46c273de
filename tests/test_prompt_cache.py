"""Prompt-cache files: velox caches through mlx_lm's save_prompt_cache and
velox.runtime.loader.load_prompt_cache, and velox-generate --save-prompt-cache / --prompt-cache-file."""

import copy
from argparse import Namespace
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import stream_generate
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import load_prompt_cache as mlx_lm_load_prompt_cache
from mlx_lm.models.cache import make_prompt_cache, save_prompt_cache

import velox
from velox.convert.cli import main as convert_main
from velox.runtime.cache import VeloxKVCache
from velox.runtime.generate import encode_prompt
from velox.runtime.generate import main as generate_main
from velox.runtime.loader import load_prompt_cache

CALIB = ["--calib-tokens", "256", "--calib-seq-len", "64", "--quiet"]
FIRST = "The quick brown fox jumps over the lazy dog. " * 3
REST = "Then it ran into the forest"


@pytest.fixture(scope="module")
def converted(tiny_llama, tmp_path_factory) -> Path:
    """Two data-free methods (one on the fast path, one decoding) with a sink and a window, so a
    saved cache holds all three regions."""
    out = tmp_path_factory.mktemp("pc") / "tiny-kv"
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--kv", "turboquant_mse,turboquant_prod",
                         "--kv-sink", "2", "--kv-window", "4", *CALIB]) == 0
    return out


def prefill(model, tokens: list[int], cache) -> None:
    for _ in generate_step(mx.array(tokens), model, max_tokens=0, prompt_cache=cache):
        pass


def continuation(model, tok, tokens: list[int], cache, n: int = 8) -> list[int]:
    return [r.token for r in stream_generate(model, tok, tokens, max_tokens=n, prompt_cache=cache)]


@pytest.mark.parametrize("method", ["turboquant_mse", "turboquant_prod"])
def test_save_load_continue_equals_uninterrupted(converted, tmp_path, method):
    model, tok = velox.load(str(converted), kv=method)
    first, rest = tok.encode(FIRST), tok.encode(REST, add_special_tokens=False)
    cache = make_prompt_cache(model)
    prefill(model, first, cache)
    assert cache[0].offset == len(first) and cache[0].coded == len(first) - 2 - 4
    path = str(tmp_path / "prompt.safetensors")
    save_prompt_cache(path, cache, {"model": str(converted)})

    loaded, meta = load_prompt_cache(path, model, return_metadata=True)
    assert meta == {"model": str(converted)}
    assert all(isinstance(c, VeloxKVCache) and c.method == method and c.fast == m.fast for c, m in zip(loaded, cache))
    assert sum(c.nbytes for c in loaded) <= sum(c.nbytes for c in cache)  # codes saved without step slack
    # Random weights repeat tokens, so compare the logits too (exactly), and check the prefix matters.
    logits = lambda c: model(mx.array(rest)[None], cache=c)
    expected = logits(copy.deepcopy(cache))
    assert mx.array_equal(logits(load_prompt_cache(path, model)), expected)
    assert not mx.allclose(logits(make_prompt_cache(model)), expected, atol=1e-3)
    assert continuation(model, tok, rest, loaded) == continuation(model, tok, rest, cache)


def test_plain_mlx_lm_reads_the_file_but_codecs_must_be_attached(converted, tmp_path):
    model, tok = velox.load(str(converted))
    cache = make_prompt_cache(model)
    prefill(model, tok.encode(FIRST), cache)
    path = str(tmp_path / "prompt.safetensors")
    save_prompt_cache(path, cache)
    plain = mlx_lm_load_prompt_cache(path)
    assert plain[0].offset == cache[0].offset and plain[0].method == "turboquant_mse"
    with pytest.raises(RuntimeError, match="load_prompt_cache"):
        plain[0].fetch()
    other, _ = velox.load(str(converted), kv="turboquant_prod")
    with pytest.raises(ValueError, match="written by turboquant_mse"):
        load_prompt_cache(path, other)


def test_generate_cli_prompt_cache_file(converted, tmp_path, capsys):
    path = str(tmp_path / "cli.safetensors")
    model_args = ["--model", str(converted), "--kv", "turboquant_prod"]
    assert generate_main([*model_args, "--prompt", FIRST, "--save-prompt-cache", path]) == 0
    assert "saved" in capsys.readouterr().out
    # --kv comes back from the file's metadata
    assert generate_main(["--model", str(converted), "--prompt", REST, "--max-tokens", "8",
                          "--prompt-cache-file", path]) == 0
    text = capsys.readouterr().out.split("\n==========")[0]

    model, tok = velox.load(str(converted), kv="turboquant_prod")
    flags = dict(ignore_chat_template=False, system_prompt=None)
    cache = make_prompt_cache(model)
    prefill(model, encode_prompt(tok, FIRST, Namespace(**flags, save_prompt_cache=path)), cache)
    rest = encode_prompt(tok, REST, Namespace(**flags, save_prompt_cache=None), continuing=True)
    expected = "".join(r.text for r in stream_generate(model, tok, rest, max_tokens=8, prompt_cache=cache))
    assert text == expected

    assert generate_main(["--model", str(tmp_path), "--prompt-cache-file", path]) == 2
    assert "was made with" in capsys.readouterr().err
