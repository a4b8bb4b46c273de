"""VeloxKVCache: an mlx_lm-compatible KV cache that holds only codes.

Keys and values are encoded as they arrive (``codec.encode``) and kept as packed
uint32 words plus per-vector fp16 norms, in buffers grown in steps like mlx_lm's
KVCache. ``update_and_fetch`` returns the decoded keys/values of the whole cache,
so every later token attends to the compressed history.

No ``bits`` attribute on purpose: mlx_lm would route such a cache to its own
affine quantized attention.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache, create_attention_mask


class VeloxKVCache(_BaseCache):
    """Compressed KV cache for one attention layer.

    key_codec / value_codec: objects with ``encode(x [B, H, L, D], offset) -> tuple of
    arrays [B, H, L, ...]`` and ``decode(*parts, offset) -> [B, H, L, D]``, where offset
    is the position of the first token (position-aware codecs code keys before RoPE).
    """

    step = 256

    def __init__(self, key_codec: Any, value_codec: Any, method: str = "", sink: int = 0):
        self.key_codec = key_codec
        self.value_codec = value_codec
        self.method = method
        self.sink = sink  # the first `sink` tokens stay in fp16 (attention sinks)
        self.sink_keys: mx.array | None = None     # [B, H, sink, D] float16
        self.sink_values: mx.array | None = None
        self.keys: list[mx.array] | None = None    # encoded parts, each [B, H, S_alloc, ...]
        self.values: list[mx.array] | None = None
        self.offset = 0
        self.elements_per_token = 0  # K + V elements per token, to report the fp16 equivalent

    def _grow(self, buffers: list[mx.array] | None, parts: tuple, needed: int) -> list[mx.array]:
        prev = self.offset - self.sink if self.offset > self.sink else 0
        if buffers is not None and needed <= buffers[0].shape[2]:
            return buffers
        n_steps = (needed + self.step - 1) // self.step
        grown = []
        for i, p in enumerate(parts):
            shape = list(p.shape)
            shape[2] = n_steps * self.step
            new = mx.zeros(shape, p.dtype)
            if buffers is not None:
                new[:, :, :prev] = buffers[i][:, :, :prev]
            grown.append(new)
        return grown

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Encode keys/values [B, H, L, D], store, return decoded [B, H, offset+L, D]."""
        dtype = keys.dtype
        self.elements_per_token = keys.shape[1] * keys.shape[3] + values.shape[1] * values.shape[3]
        n_sink = max(0, min(self.sink - self.offset, keys.shape[2]))
        if n_sink:
            self._store_sink(keys[:, :, :n_sink], values[:, :, :n_sink])
            keys, values = keys[:, :, n_sink:], values[:, :, n_sink:]
            self.offset += n_sink
        if keys.shape[2]:
            k_parts = self.key_codec.encode(keys, offset=self.offset)
            v_parts = self.value_codec.encode(values, offset=self.offset)
            prev = self.offset - self.sink
            end = prev + keys.shape[2]
            self.keys = self._grow(self.keys, k_parts, end)
            self.values = self._grow(self.values, v_parts, end)
            for buf, part in zip(self.keys, k_parts):
                buf[:, :, prev:end] = part
            for buf, part in zip(self.values, v_parts):
                buf[:, :, prev:end] = part
            self.offset += keys.shape[2]
        return self._fetch(dtype)

    def _store_sink(self, keys: mx.array, values: mx.array) -> None:
        if self.sink_keys is None:
            B, H, _, D = keys.shape
            self.sink_keys = mx.zeros((B, H, self.sink, D), mx.float16)
            self.sink_values = mx.zeros((B, H, self.sink, values.shape[-1]), mx.float16)
        start, end = self.offset, self.offset + keys.shape[2]
        self.sink_keys[:, :, start:end] = keys.astype(mx.float16)
        self.sink_values[:, :, start:end] = values.astype(mx.float16)

    def _fetch(self, dtype) -> tuple[mx.array, mx.array]:
        n_sink = min(self.offset, self.sink)
        n_coded = self.offset - n_sink
        ks, vs = [], []
        if n_sink:
            ks.append(self.sink_keys[:, :, :n_sink].astype(dtype))
            vs.append(self.sink_values[:, :, :n_sink].astype(dtype))
        if n_coded:
            ks.append(self.key_codec.decode(*[b[:, :, :n_coded] for b in self.keys], offset=n_sink).astype(dtype))
            vs.append(self.value_codec.decode(*[b[:, :, :n_coded] for b in self.values], offset=n_sink).astype(dtype))
        if len(ks) == 1:
            return ks[0], vs[0]
        return mx.concatenate(ks, axis=2), mx.concatenate(vs, axis=2)

    def size(self) -> int:
        return self.offset

    @property
    def state(self):
        n_coded = max(0, self.offset - self.sink)
        cut = lambda bufs: [] if bufs is None else [b[:, :, :n_coded] for b in bufs]
        sink = [] if self.sink_keys is None else [self.sink_keys, self.sink_values]
        return cut(self.keys), cut(self.values), sink, self.offset

    @state.setter
    def state(self, v):
        keys, values, sink, self.offset = v
        self.keys = list(keys) or None
        self.values = list(values) or None
        self.sink_keys, self.sink_values = sink if sink else (None, None)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)

    def empty(self) -> bool:
        return self.offset == 0 and self.keys is None and self.sink_keys is None

    @property
    def fp16_nbytes(self) -> int:
        """Bytes mlx_lm's fp16 KVCache would hold for the same tokens (batch 1; it too
        allocates in steps of 256 tokens), to compare like with like."""
        allocated = -(-self.offset // self.step) * self.step
        return allocated * self.elements_per_token * 2

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays this cache holds (codes and norms, with step slack)."""
        held = (self.keys or []) + (self.values or [])
        if self.sink_keys is not None:
            held += [self.sink_keys, self.sink_values]
        return sum(b.nbytes for b in held)
