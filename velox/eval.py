"""Quality measurement where later tokens really attend to the compressed cache.

Teacher-forced decode: each window gets a fresh cache, a short prefill, then
chunks of at most 16 tokens; only the tokens predicted after the prefill are
scored, so every scored token attends to the compressed keys/values of all
earlier tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache, QuantizedKVCache
from tqdm import tqdm

from .runtime.layers import native_caches


@dataclass
class PerplexityResult:
    """Per-token NLL (nats) of the scored tokens, per window."""

    nll: np.ndarray  # [windows, scored tokens per window]

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def ppl(self) -> float:
        return float(np.exp(self.mean_nll))

    @property
    def tokens(self) -> int:
        return int(self.nll.size)


def teacher_forced_nll(model, tokens: np.ndarray, make_cache: Callable[[], list[Any]],
                       window: int = 1024, prefill: int = 32, chunk: int = 16,
                       max_windows: int | None = None, progress: bool = False) -> PerplexityResult:
    """Score ``tokens [T]`` in non-overlapping windows of ``window`` tokens.

    make_cache: builds a fresh prompt cache (one per window).
    """
    n_windows = len(tokens) // window
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"need at least {window} tokens for one window, got {len(tokens)}")
    out = []
    steps = [(w, s) for w in range(n_windows) for s in range(prefill, window - 1, chunk)]
    bar = tqdm(total=len(steps), desc="teacher-forced", disable=not progress)
    for w in range(n_windows):
        ids = mx.array(tokens[w * window : (w + 1) * window])
        cache = make_cache()
        model(ids[None, :prefill], cache=cache)
        nll = []
        for start in range(prefill, window - 1, chunk):
            end = min(start + chunk, window - 1)
            logits = model(ids[None, start:end], cache=cache).astype(mx.float32)
            nll.append(nn.losses.cross_entropy(logits[0], ids[start + 1 : end + 1]))
            mx.eval(nll[-1])
            bar.update()
        out.append(np.array(mx.concatenate(nll)))
    bar.close()
    return PerplexityResult(nll=np.stack(out))


def mlx_baseline_cache(model, name: str) -> Callable[[], list[Any]]:
    """Cache factories for mlx_lm's own caches: 'fp16' (the model's own caches) or
    'mlx4'/'mlx8'/'mlx2' (its plain KVCache layers quantized, as mlx_lm's ``--kv-bits`` does;
    sliding-window and linear-attention layers keep their caches)."""
    if name == "fp16":
        return lambda: native_caches(model)
    if name.startswith("mlx") and name[3:].isdigit():
        bits = int(name[3:])
        return lambda: [QuantizedKVCache(group_size=64, bits=bits) if type(c) is KVCache else c
                        for c in native_caches(model)]
    raise ValueError(f"unknown baseline {name!r} (fp16, mlx2, mlx4, mlx8)")


def bootstrap_delta(nll: np.ndarray, ref_nll: np.ndarray, n: int = 2000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """Paired bootstrap over windows of ΔPPL = PPL/PPL_ref − 1: (low, high) interval.

    nll, ref_nll: [windows, tokens] per-token NLL of the same tokens.
    """
    rng = np.random.default_rng(seed)
    w = nll.shape[0]
    idx = rng.integers(0, w, size=(n, w))
    a = nll.mean(axis=1)[idx].mean(axis=1)
    b = ref_nll.mean(axis=1)[idx].mean(axis=1)
    delta = np.exp(a - b) - 1
    tail = (1 - level) / 2
    return float(np.quantile(delta, tail)), float(np.quantile(delta, 1 - tail))


def round_trip(cache, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
    """What attention would read back after storing keys/values [B, H, L, D] in a fresh cache."""
    k, v = cache.update_and_fetch(keys, values)
    if hasattr(cache, "fetch"):  # a velox cache on the fast path returns only the new tokens
        k, v = cache.fetch(keys.dtype)
    if isinstance(k, tuple):  # mlx_lm's QuantizedKVCache returns (codes, scales, biases)
        deq = lambda t: mx.dequantize(*t, group_size=cache.group_size, bits=cache.bits)
        k, v = deq(k), deq(v)
    return k.astype(mx.float32), v.astype(mx.float32)


def causal_attention(q: mx.array, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
    """q [Hq, L, D], k/v [Hk, L, D] -> (output [Hq, L, D], scores [Hq, L, L] with -inf above the diagonal)."""
    Hq, L, D = q.shape
    rep = Hq // k.shape[0]
    k, v = mx.repeat(k, rep, axis=0), mx.repeat(v, rep, axis=0)
    scores = (q @ k.swapaxes(-1, -2)) * D**-0.5
    scores = mx.where(mx.tril(mx.ones((L, L), dtype=mx.bool_)), scores, -mx.inf)
    return mx.softmax(scores, axis=-1, precise=True) @ v, scores


def attention_fidelity(acts: list, make_cache: Callable[[], list[Any]], length: int = 512) -> list[dict]:
    """Per layer, on real activations: relative error of the attention output and cosine
    similarity of the score rows, compressed cache vs exact keys/values.

    acts: LayerActivations per layer (from ``velox.convert.capture.capture``); the first
    ``length`` tokens (one sequence) are used.
    """
    caches = make_cache()
    out = []
    for i, (a, cache) in enumerate(zip(acts, caches)):
        if a is None or a.queries is None:
            continue
        t = lambda x: mx.array(x[:length].astype(np.float32)).transpose(1, 0, 2)
        q, k, v = t(a.queries), t(a.keys), t(a.values)
        kh, vh = round_trip(cache, k[None], v[None])
        ref, s_ref = causal_attention(q, k, v)
        got, s_got = causal_attention(q, kh[0], vh[0])
        rel = mx.linalg.norm(got - ref) / mx.linalg.norm(ref)
        tri = mx.tril(mx.ones((length, length), dtype=mx.bool_))
        a_, b_ = mx.where(tri, s_ref, 0), mx.where(tri, s_got, 0)
        cos = mx.sum(a_ * b_, axis=-1) / (mx.linalg.norm(a_, axis=-1) * mx.linalg.norm(b_, axis=-1))
        out.append({"layer": i, "output_rel_error": rel.item(), "score_cosine": mx.mean(cos).item()})
    return out


def bytes_per_token(model, make_cache: Callable[[], list[Any]], tokens: np.ndarray, n: int = 1024) -> float:
    """Bytes the caches hold per token (all layers), measured after ``n`` tokens (a 256 multiple)."""
    cache = make_cache()
    model(mx.array(tokens[None, :n]), cache=cache)
    return sum(c.nbytes for c in cache) / n


PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_accuracy(model, tokenizer, make_cache: Callable[[], list[Any]], filler: str,
                     lengths: tuple[int, ...] = (512, 1024), depths: tuple[float, ...] = (0.1, 0.5, 0.9),
                     seed: int = 0) -> dict:
    """Greedy retrieval of a 5-digit key hidden in real filler text at several depths.

    Returns {"accuracy": float, "cases": [{length, depth, key, answer, ok}]}.
    """
    rng = np.random.default_rng(seed)
    filler_ids = tokenizer.encode(filler)
    cases = []
    for length in lengths:
        for depth in depths:
            key = str(rng.integers(10000, 100000))
            needle = tokenizer.encode(" " + PASSKEY_LINE.format(key=key) + " ")
            question = tokenizer.encode(PASSKEY_QUESTION)
            room = length - len(needle) - len(question)
            at = int(room * depth)
            ids = filler_ids[:at] + needle + filler_ids[at:room] + question
            cache = make_cache()
            logits = model(mx.array(ids)[None], cache=cache)
            answer = []
            for _ in range(7):
                nxt = int(mx.argmax(logits[0, -1]).item())
                answer.append(nxt)
                logits = model(mx.array([[nxt]]), cache=cache)
            text = tokenizer.decode(answer)
            cases.append({"length": length, "depth": depth, "key": key, "answer": text.strip(),
                          "ok": key in text})
    return {"accuracy": float(np.mean([c["ok"] for c in cases])), "cases": cases}
