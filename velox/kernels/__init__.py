"""Compressed-domain attention: one dispatch point over the backends.

``attend`` picks a kernel for the running backend when one exists for the cache's codecs and
shapes, and otherwise runs the pure-mx reference (``reference.attend``). The GPU kernels
(``source``) are written once and compiled per backend: ``cuda`` with ``mx.fast.cuda_kernel``,
``metal`` with ``mx.fast.metal_kernel``. MLX's CPU backend runs no custom kernels: there
``cpu`` computes the coded tokens' partial with a C function compiled on first use
(``cpu_decode.c``) and the reference does the rest. All take ScalarCodec (turboquant_mse) keys
and values; the CPU's also every calibrated method's pre-RoPE keys (spectral in either basis,
vecinfer, rabitq, commvq); every other codec runs the reference.
On a GPU the decode launch also encodes the step's new key and value into the cache's code
buffers (``CompressedKV.new``); ``append`` does that alone, in one launch ordered before the
next decode launch, for a cache read some other way first.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from functools import lru_cache
from typing import Callable, Optional

import mlx.core as mx

from ..methods.scalar import ScalarCodec
from . import fused
from .reference import CompressedKV, Mask, supports
from .reference import attend as reference_attend

__all__ = ["CompressedKV", "append", "appends", "attend", "attention_path", "backend", "supports"]


def backend() -> str:
    """'metal', 'cuda' or 'cpu': where the default device runs custom kernels (if anywhere)."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else "cpu"


@lru_cache(maxsize=None)
def _fused_module(name: str):
    return importlib.import_module(f".{name}", __name__)  # velox.kernels.cuda / .metal / .cpu


def _kernel_backend(key_codec, value_codec) -> Optional[str]:
    """The backend whose kernels take this codec pair (ScalarCodec keys and values), else None."""
    return backend() if type(key_codec) is ScalarCodec and type(value_codec) is ScalarCodec else None


def _fused_for(queries: mx.array, kv: CompressedKV, mask: Mask):
    """The backend's fused-kernel module when it takes this call, else None."""
    # the CPU's C kernel also takes pre-RoPE keys (cpu.supports checks the codecs itself)
    name = "cpu" if backend() == "cpu" else _kernel_backend(kv.key_codec, kv.value_codec)
    if name is not None and _fused_module(name).supports(queries, kv, mask):
        return _fused_module(name)
    return None


def attend(queries: mx.array, kv: CompressedKV, scale: float, mask: Mask = None,
           sinks: Optional[mx.array] = None, on_reference: Optional[Callable[[], None]] = None) -> mx.array:
    """Attention of queries [B, Hq, L, D] over a compressed cache -> [B, Hq, L, D]
    (semantics of ``mx.fast.scaled_dot_product_attention`` on the decoded cache).
    on_reference: called before mx ops (not a kernel chained after ``append``'s) read the codes;
    it must write kv.new into the buffers (which only the GPU decode kernel takes as it is)."""
    kernel = _fused_for(queries, kv, mask)
    if kernel is None or backend() == "cpu":
        if on_reference is not None:
            on_reference()  # the CPU kernel reads evaluated arrays, as mx ops do
        elif kv.new is not None:
            raise ValueError("kernels.attend: kv.new is not in the buffers and no on_reference writes it")
        if kv.new is not None:
            kv = replace(kv, new=None)
    elif kv.new is not None and (kv.sink is not None or kv.recent is not None):
        raise ValueError("kernels.attend: kv.new takes the decode kernel, which reads codes only")
    if kernel is None and queries.shape[2] > 1 and _pre_rope(kv.key_codec):
        # prefill over pre-RoPE keys: their blocks decode one by one in mx ops, far slower than
        # decoding the history once for this chunk (which a decode step never does)
        return mx.fast.scaled_dot_product_attention(queries, *decoded(kv, queries.dtype), scale=scale, mask=mask,
                                                    sinks=sinks)
    if kernel is None:
        return reference_attend(queries, kv, scale=scale, mask=mask, sinks=sinks)
    if kv.sink is None and kv.recent is None:  # codes only: the whole step in one launch
        return kernel.decode(queries, kv, scale, sinks)
    # fp16 regions: the kernel takes the coded tokens, the reference merges the rest
    return reference_attend(queries, kv, scale=scale, mask=mask, sinks=sinks, coded_partial=kernel.coded_partial)


def attention_path(key_codec, value_codec) -> str:
    """How a decode step over these codecs attends on the running backend: "kernel" (a custom
    kernel reads the codes), "mx reference" (mx ops read the codes) or "decoded history"."""
    if not supports(key_codec, value_codec):
        return "decoded history"
    if backend() == "cpu":
        from . import cpu

        kernel = type(value_codec) is ScalarCodec and cpu.takes_keys(key_codec)
    else:
        kernel = _kernel_backend(key_codec, value_codec) is not None
    return "kernel" if kernel else "mx reference"


def _pre_rope(codec) -> bool:
    from ..methods.ratequant import HeadGroupCodec
    from ..methods.rope import PreRopeCodec

    if isinstance(codec, HeadGroupCodec):
        return any(_pre_rope(inner) for _, inner in codec.groups)
    return type(codec) is PreRopeCodec


def decoded(kv: CompressedKV, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    """The cache's whole history decoded: keys, values [B, Hkv, length, D] in ``dtype``
    (``VeloxKVCache.fetch``, and prefill over pre-RoPE keys). kv.new must be in the buffers."""
    n = kv.n_coded
    ks, vs = [], []
    if kv.sink is not None:
        ks.append(kv.sink[0]), vs.append(kv.sink[1])
    if n:
        ks.append(kv.key_codec.decode(*[p[:, :, :n] for p in kv.keys], offset=kv.n_sink))
        vs.append(kv.value_codec.decode(*[p[:, :, :n] for p in kv.values], offset=kv.n_sink))
    if kv.recent is not None:
        ks.append(kv.recent[0]), vs.append(kv.recent[1])
    ks, vs = [x.astype(dtype) for x in ks], [x.astype(dtype) for x in vs]
    if len(ks) == 1:
        return ks[0], vs[0]
    return mx.concatenate(ks, axis=2), mx.concatenate(vs, axis=2)


def appends(keys: mx.array, key_codec, value_codec) -> bool:
    """Whether a GPU kernel encodes keys [B, H, L, D] of these codecs (``append``, and the
    decode launch through ``CompressedKV.new``). On the CPU the mx ops encode (one token: no
    gather to avoid)."""
    name = _kernel_backend(key_codec, value_codec)
    return name not in (None, "cpu") and fused.append_supports(keys, key_codec, value_codec)


def append(keys: mx.array, values: mx.array, key_codec, value_codec, key_parts: list[mx.array],
           value_parts: list[mx.array], slot: int) -> mx.array:
    """Encode one token's keys/values [B, H, 1, D] into slot ``slot`` of a cache's code buffers
    in place with the backend's kernel (``fused.FusedDecode.append``; ``appends`` must hold).
    Returns the launch's output, which must be evaluated before anything but the decode kernel
    reads the buffers."""
    return _fused_module(backend()).append(keys, values, key_codec, value_codec, key_parts, value_parts, slot)
