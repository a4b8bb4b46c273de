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
    """Cache factories for mlx_lm's own caches: 'fp16' (unquantized) or 'mlx4'/'mlx8'/'mlx2'."""
    n = len(model.layers)
    if name == "fp16":
        return lambda: [KVCache() for _ in range(n)]
    if name.startswith("mlx") and name[3:].isdigit():
        bits = int(name[3:])
        return lambda: [QuantizedKVCache(group_size=64, bits=bits) for _ in range(n)]
    raise ValueError(f"unknown baseline {name!r} (fp16, mlx2, mlx4, mlx8)")
