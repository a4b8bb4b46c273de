"""VeloxKVCache: an mlx_lm-compatible KV cache that holds only codes.

Keys and values are encoded as they arrive (``codec.encode``) and kept as packed
codes plus per-vector scalars, in buffers grown in steps like mlx_lm's KVCache.
``update_and_fetch`` returns the decoded keys/values of the whole cache, so every
later token attends to the compressed history.

Fast path (``fast=True``, codecs that ``velox.kernels`` supports, the attention
dispatcher installed): ``update_and_fetch`` returns only the new keys/values and
``attend`` computes attention from the codes (``velox.kernels.attend``), so no step
decodes the history. ``fetch()`` still gives the decoded history to code that needs it.

Two optional fp16 regions bracket the codes: the first ``sink`` tokens (attention
sinks) and the most recent ``window`` tokens (KIVI's residual window; a token is
encoded when it leaves the window). Positions: [sink | coded | window].

No ``bits`` attribute on purpose: mlx_lm would route such a cache to its own
affine quantized attention.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache, create_attention_mask

from .. import kernels
from . import attention


class ExactCodec:
    """Identity codec: keeps a tensor as it is (to code only keys or only values, or to test)."""

    def encode(self, x: mx.array, offset: int = 0) -> tuple[mx.array]:
        return (x,)

    def decode(self, x: mx.array, offset: int = 0) -> mx.array:
        return x


class _DetachedCodec:
    """Stands in for the codecs of a cache read from a prompt-cache file without its model."""

    def _refuse(self, *args, **kwargs):
        raise RuntimeError("this VeloxKVCache was read from a prompt-cache file without its model: load it with "
                           "velox.runtime.loader.load_prompt_cache(path, model)")

    encode = decode = _refuse


class VeloxKVCache(_BaseCache):
    """Compressed KV cache for one attention layer.

    key_codec / value_codec: objects with ``encode(x [B, H, L, D], offset) -> tuple of
    arrays [B, H', L, ...]`` and ``decode(*parts, offset) -> [B, H, L, D]``, where offset
    is the position of the first token (position-aware codecs code keys before RoPE).
    sink / window: tokens kept in fp16 at the start / the end of the sequence.
    fast: attend from the codes when the codecs allow it (see the module docstring).
    """

    step = 256

    def __init__(self, key_codec: Any, value_codec: Any, method: str = "", sink: int = 0, window: int = 0,
                 fast: bool = False):
        self.key_codec = key_codec
        self.value_codec = value_codec
        self.method = method
        self.sink = sink
        self.window = window
        self.sink_kv: list[mx.array] | None = None    # [keys, values], each [B, H, sink, D] float16
        self.recent_kv: list[mx.array] | None = None  # [keys, values], each [B, H, <= window, D] float16
        self.keys: list[mx.array] | None = None       # encoded parts, each [B, H', S_alloc, ...]
        self.values: list[mx.array] | None = None
        self.coded = 0   # tokens held as codes
        self.offset = 0
        self.elements_per_token = 0  # K + V elements per token, to report the fp16 equivalent
        self.fast = fast and kernels.supports(key_codec, value_codec)
        # Whether the last update_and_fetch returned only the new tokens (attend must read the codes).
        self.codes_only = False
        # A decode step's keys and values [B, H, 1, D], counted in ``coded`` but not yet in the
        # buffers: the GPU decode launch encodes them (CompressedKV.new), or ``flush``.
        self.pending: tuple[mx.array, mx.array] | None = None
        # The output of the last kernel that wrote the buffers in place (the decode launch, or
        # kernels.append): until it is evaluated, only a kernel chained after it may read them.
        self.unsettled: mx.array | None = None

    def flush(self) -> None:
        """Write a pending token into the buffers with the append kernel (not yet evaluated)."""
        if self.pending is not None:
            keys, values = self.pending
            self.pending = None
            self.unsettled = kernels.append(keys, values, self.key_codec, self.value_codec,
                                            self.keys, self.values, self.coded - 1)

    def settle(self) -> None:
        """Wait for in-place writes, so that any mx op may read the code buffers."""
        self.flush()
        if self.unsettled is not None:
            mx.eval(self.unsettled)
            self.unsettled = None

    @property
    def n_sink(self) -> int:
        return min(self.offset, self.sink)

    @property
    def n_recent(self) -> int:
        return self.offset - self.n_sink - self.coded

    def _grow(self, buffers: list[mx.array] | None, parts: tuple, needed: int) -> list[mx.array]:
        if buffers is not None and needed <= buffers[0].shape[2]:
            return buffers
        n_steps = (needed + self.step - 1) // self.step
        grown = []
        for i, p in enumerate(parts):
            shape = list(p.shape)
            shape[2] = n_steps * self.step
            new = mx.zeros(shape, p.dtype)
            if buffers is not None:
                new[:, :, :self.coded] = buffers[i][:, :, :self.coded]
            grown.append(new)
        return grown

    def _encode(self, keys: mx.array, values: mx.array) -> None:
        """Append keys/values [B, H, L, D] (the tokens right after the coded ones) as codes."""
        end = self.coded + keys.shape[2]
        if (self.fast and attention.is_installed() and self.keys is not None and end <= self.keys[0].shape[2]
                and kernels.appends(keys, self.key_codec, self.value_codec)):
            # a decode step on a GPU: the decode launch (else ``flush``) writes the codes in place
            self.flush()
            self.pending = (keys, values)
            self.coded = end
            return
        self.settle()
        position = self.n_sink + self.coded
        k_parts = self.key_codec.encode(keys, offset=position)
        v_parts = self.value_codec.encode(values, offset=position)
        self.keys = self._grow(self.keys, k_parts, end)
        self.values = self._grow(self.values, v_parts, end)
        for buf, part in zip(self.keys + self.values, k_parts + v_parts):
            buf[:, :, self.coded:end] = part
        self.coded = end

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store keys/values [B, H, L, D]; return the decoded history [B, H, offset+L, D],
        or on the fast path the given keys/values themselves (``attend`` ignores them)."""
        new_keys, new_values = keys, values
        dtype = keys.dtype
        self.elements_per_token = keys.shape[1] * keys.shape[3] + values.shape[1] * values.shape[3]
        n_sink = max(0, min(self.sink - self.offset, keys.shape[2]))
        if n_sink:
            new = [x[:, :, :n_sink].astype(mx.float16) for x in (keys, values)]
            self.sink_kv = new if self.sink_kv is None else [mx.concatenate([a, b], axis=2)
                                                            for a, b in zip(self.sink_kv, new)]
            keys, values = keys[:, :, n_sink:], values[:, :, n_sink:]
            self.offset += n_sink
        if keys.shape[2] and self.window:
            new = [x.astype(mx.float16) for x in (keys, values)]
            if self.recent_kv is not None:
                new = [mx.concatenate([a, b], axis=2) for a, b in zip(self.recent_kv, new)]
            leaving = new[0].shape[2] - self.window
            self.offset += keys.shape[2]
            if leaving > 0:
                self._encode(new[0][:, :, :leaving], new[1][:, :, :leaving])
                new = [x[:, :, leaving:] for x in new]
            self.recent_kv = new
        elif keys.shape[2]:
            self.offset += keys.shape[2]
            self._encode(keys, values)
        # Only while the dispatcher is installed does attention reach ``attend``; otherwise
        # mlx_lm's own sdpa would see just the new tokens, so hand it the decoded history.
        self.codes_only = self.fast and attention.is_installed()
        if self.codes_only:
            return new_keys, new_values
        return self.fetch(dtype)

    def fetch(self, dtype=mx.float32) -> tuple[mx.array, mx.array]:
        """The decoded history: keys, values [B, H, offset, D] in ``dtype``."""
        self.settle()
        return kernels.decoded(self.compressed(), dtype)

    def fp16_regions(self) -> tuple[list[mx.array] | None, list[mx.array] | None]:
        """The held sink and window tokens: ([keys, values] [B, H, n, D] fp16, or None), each."""
        held = lambda kv, n: None if kv is None or not n else [x[:, :, :n] for x in kv]
        return held(self.sink_kv, self.n_sink), held(self.recent_kv, self.n_recent)

    def compressed(self) -> kernels.CompressedKV:
        """What the cache holds, for ``velox.kernels.attend`` (code buffers whole, see CompressedKV)."""
        sink, recent = self.fp16_regions()
        if self.pending is not None and (sink or recent):
            self.flush()  # the decode kernel takes a new token only over codes alone
        return kernels.CompressedKV(
            key_codec=self.key_codec, value_codec=self.value_codec, n_coded=self.coded,
            keys=tuple(self.keys) if self.coded else None, values=tuple(self.values) if self.coded else None,
            sink=tuple(sink) if sink else None, recent=tuple(recent) if recent else None, new=self.pending)

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float,
               mask=None, sinks: mx.array | None = None) -> mx.array:
        """Attention for the dispatcher: queries [B, Hq, L, D] -> [B, Hq, L, D]. keys/values
        are what update_and_fetch returned (the decoded history unless ``codes_only``)."""
        if self.codes_only:
            out = kernels.attend(queries, self.compressed(), scale=scale, mask=mask, sinks=sinks,
                                 on_reference=self.settle)
            if self.pending is not None:  # the decode launch wrote it (on_reference would have flushed)
                self.pending = None
                self.unsettled = out
            return out
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask, sinks=sinks)

    def size(self) -> int:
        return self.offset

    @property
    def state(self):
        """(key parts, value parts, sink [K, V], recent [K, V], offset, method, sink, window).

        Absent parts are None, not []: mlx_lm's save_prompt_cache flattens the state with
        tree_flatten, which drops empty lists and so would shift the entries after them.
        The settings ride along as scalars (mlx_lm 0.32 has no meta_state) so a loader can
        refuse a file written with other settings. The codecs are not arrays and are not
        part of the state: see ``from_state``.
        """
        self.settle()
        cut = lambda bufs: None if bufs is None or not self.coded else [b[:, :, :self.coded] for b in bufs]
        return (cut(self.keys), cut(self.values), *self.fp16_regions(), self.offset, self.method,
                self.sink, self.window)

    @state.setter
    def state(self, v):
        keys, values, sink, recent, self.offset, self.method, self.sink, self.window = v
        self.pending = None
        self.keys = list(keys) if keys else None
        self.values = list(values) if values else None
        self.coded = self.keys[0].shape[2] if self.keys else 0
        self.sink_kv = list(sink) if sink else None
        self.recent_kv = list(recent) if recent else None

    @classmethod
    def from_state(cls, state):
        """A cache with ``state`` and no codecs: mlx_lm's load_prompt_cache calls this, and
        codecs (rotations, codebooks) live in the model folder, not in prompt-cache files.
        ``velox.runtime.loader.load_prompt_cache(path, model)`` puts the state into the
        model's own caches instead; a cache made here refuses to code or decode."""
        obj = cls(_DetachedCodec(), _DetachedCodec())
        obj.state = state
        return obj

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last n tokens: from the window first, then the codes, then the sink."""
        n = min(self.offset, n)
        from_recent = min(n, self.n_recent)
        if from_recent:
            self.recent_kv = [x[:, :, :self.n_recent - from_recent] for x in self.recent_kv]
        from_coded = min(n - from_recent, self.coded)
        if from_coded:
            self.pending = None  # the last coded token, never written
        self.coded -= from_coded
        self.offset -= n
        if self.sink_kv is not None:
            self.sink_kv = [x[:, :, :self.n_sink] for x in self.sink_kv]
        return n

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)

    def empty(self) -> bool:
        return self.offset == 0

    @property
    def fp16_nbytes(self) -> int:
        """Bytes mlx_lm's fp16 KVCache would hold for the same tokens (batch 1; it too
        allocates in steps of 256 tokens), to compare like with like."""
        allocated = -(-self.offset // self.step) * self.step
        return allocated * self.elements_per_token * 2

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays this cache holds (codes, scalars with step slack, fp16 sink and window)."""
        held = (self.keys or []) + (self.values or []) + (self.sink_kv or []) + (self.recent_kv or [])
        return sum(b.nbytes for b in held)
