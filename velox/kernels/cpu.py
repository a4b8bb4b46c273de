"""Decode attention from the codes on the CPU: ``cpu_decode.c``, compiled on first use.

One C function per key layout, all sharing the softmax and the ScalarCodec value sums:
``velox_cpu_partial`` (ScalarCodec keys: turboquant_mse), ``velox_cpu_partial_rope`` (pre-RoPE
keys in a basis of 2×2 turns within RoPE pairs: spectral's pair basis, O(D) per key),
``velox_cpu_partial_commvq`` (commvq's RoPE-commuting codebooks) and ``velox_cpu_partial_dense``
(pre-RoPE keys in a basis that mixes pairs: spectral's full eigenbasis as a D×D matrix per tile
of keys, vecinfer's and rabitq's randomized Hadamard as a fast transform).

MLX's CPU backend runs no custom kernels, and its gathers cost ~8–11 ns per code (docs/BENCHMARKS.md,
session 6): turning 4-bit codes into levels in mx ops takes longer than float32 SDPA's whole
step. So on the CPU the coded tokens' partial comes from a small C function instead, compiled
with the system's C compiler (``$CC``, else ``cc``) into ``~/.cache/velox/kernels`` (``$VELOX_CACHE_DIR``)
keyed by the source, compiler and machine, and called through ctypes on the arrays' memory. No
compiler, a failed build or ``VELOX_CPU_KERNEL=0``: the pure-mx reference runs, as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Optional

import mlx.core as mx
import numpy as np

from ..methods.commvq import CommVQCodec
from ..methods.rabitq import RaBitQCodec
from ..methods.rope import PreRopeCodec, commutes_with_rope, cos_sin_table
from ..methods.scalar import ScalarCodec, per_codec, sign_layout
from ..methods.vecinfer import ProductCodec
from . import reference
from .fused import tables
from .reference import CompressedKV

SOURCE = Path(__file__).with_name("cpu_decode.c")
MAX_D = 256  # the C file's MAX_D
TILE = 16  # and its TT
# tried in order: OpenMP over (batch, KV head) pairs where the compiler has it
FLAGS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])


def _cache_dir() -> Path:
    return Path(os.environ.get("VELOX_CACHE_DIR", Path.home() / ".cache" / "velox")) / "kernels"


def _compile(cc: str, out: Path) -> bool:
    """Build SOURCE into the shared library ``out`` (written under a temporary name, then renamed:
    no half-written library is ever loaded). False if every flag set fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for flags in FLAGS:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cc, *flags, "-fPIC", "-shared", str(SOURCE), "-o", tmp, "-lm"]
        try:
            if subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0:
                os.replace(tmp, out)
                return True
        except (OSError, subprocess.SubprocessError):
            pass
        Path(tmp).unlink(missing_ok=True)
    return False


@lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled ``cpu_decode.c``, built on first use; None where it cannot be (no compiler,
    a failed build, VELOX_CPU_KERNEL=0)."""
    if os.environ.get("VELOX_CPU_KERNEL", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), cc.encode(), platform.machine().encode(),
                                      platform.node().encode(), repr(FLAGS).encode()])).hexdigest()[:16]
    path = _cache_dir() / f"cpu_decode-{key}.so"
    try:
        if not path.exists() and not _compile(cc, path):
            warnings.warn(f"velox: could not compile {SOURCE.name} with {cc}; CPU attention uses mx ops")
            return None
        # OpenMP's idle threads spin by default, and then take the cores from OpenBLAS's threads
        # in the next layer's matmuls: on SmolLM2 (2 cores) that alone made decoding 0.68× fp16's
        # speed instead of 1.17× (docs/BENCHMARKS.md, session 14). libgomp reads this as it loads.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        warnings.warn(f"velox: could not load {path}: {e}; CPU attention uses mx ops")
        return None
    lib.velox_cpu_partial.restype = None
    lib.velox_cpu_partial.argtypes = [ctypes.c_int] * 8 + [ctypes.c_void_p] * 12
    lib.velox_cpu_partial_rope.restype = None
    lib.velox_cpu_partial_rope.argtypes = [ctypes.c_int] * 10 + [ctypes.c_void_p] * 9 + [ctypes.c_int] + [ctypes.c_void_p] * 6
    lib.velox_cpu_partial_commvq.restype = None
    lib.velox_cpu_partial_commvq.argtypes = [ctypes.c_int] * 10 + [ctypes.c_void_p] * 15
    lib.velox_cpu_partial_dense.restype = None
    lib.velox_cpu_partial_dense.argtypes = [ctypes.c_int] * 14 + [ctypes.c_void_p] * 14 + [ctypes.c_int] + [ctypes.c_void_p] * 6
    return lib


def supports(queries: mx.array, kv: CompressedKV, mask) -> bool:
    """Decode (L = 1, no mask), head_dim ≤ 256, with the C library built, over ScalarCodec values
    of one width dividing 32 (uint32 words, fp16 norms) and keys ``takes_keys`` accepts."""
    B, Hq, L, D = queries.shape
    kc, vc = kv.key_codec, kv.value_codec
    if not (L == 1 and mask is None and kv.n_coded > 0 and D <= MAX_D and library() is not None):
        return False
    return (takes_keys(kc) and [p.dtype for p in kv.keys] == _key_dtypes(kc)
            and type(vc) is ScalarCodec and tables(vc).bits > 0
            and [p.dtype for p in kv.values] == [mx.uint32, mx.float16] and Hq % key_heads(kc) == 0)


def takes_keys(codec) -> bool:
    """Whether one of this module's kernels scores keys of this codec: ScalarCodec's, or any
    calibrated method's pre-RoPE keys (pair basis, commvq, or a dense basis)."""
    if type(codec) is ScalarCodec:
        return tables(codec).bits > 0
    if type(codec) is not PreRopeCodec:
        return False
    if type(codec.inner) is CommVQCodec:
        return codec.inner.codebooks.shape[2] == 16
    if _pair_basis(codec):
        return codec.inner.levels.shape[-1] <= 256
    return dense_tables(codec) is not None


def key_heads(codec) -> int:
    """KV heads of a key codec ``takes_keys`` accepts."""
    inner = codec.inner if type(codec) is PreRopeCodec else codec
    if type(inner) is CommVQCodec:
        return inner.heads
    if type(inner) is ScalarCodec:
        return inner.scale.shape[0]
    return dense_tables(codec).klev.shape[0]


def _pair_basis(codec: PreRopeCodec) -> bool:
    return type(codec.inner) is ScalarCodec and commutes_with_rope(codec)


def _key_dtypes(codec) -> list:
    """The code arrays' dtypes each kernel reads, in the order the codec's encode gives them."""
    if type(codec) is PreRopeCodec:
        inner = type(codec.inner)
        if inner is CommVQCodec:
            return [mx.uint8, mx.float16]
        if inner is ProductCodec:
            return [mx.uint8]
        if inner is RaBitQCodec:
            return [mx.uint32, mx.uint8, mx.float16]
    return [mx.uint32, mx.float16]


class RopeTables(NamedTuple):
    """What ``velox_cpu_partial_rope`` reads of a pre-RoPE key codec (built once per codec)."""

    levels: np.ndarray   # [H, D, K] float32: the inner codec's levels times its scale
    layout: np.ndarray   # [H, D, 3] int32: word, shift and width of each code
    mean: np.ndarray     # [H, D] float32: the mean in the codec's basis (mean @ R), zeros without one
    pairs: np.ndarray    # [D/2, 2] int32: the rope's pairs


def rope_tables(codec: PreRopeCodec) -> RopeTables:
    return per_codec(codec, "cpu_rope", _build_rope_tables)


def _build_rope_tables(codec: PreRopeCodec) -> RopeTables:
    inner = codec.inner
    H, D = inner.scale.shape
    mean = np.zeros(inner.scale.shape, np.float32) if inner.mean is None else np.array(
        (inner.mean[:, None, :] @ inner.rotation)[:, 0].astype(mx.float32))
    return RopeTables(levels=np.ascontiguousarray(np.array((inner.levels * inner.scale[..., None]).astype(mx.float32))),
                      layout=_layout_array(inner.layout, inner.bits, H, D), mean=np.ascontiguousarray(mean),
                      pairs=np.ascontiguousarray(codec.rope.pairs.astype(np.int32)))


def _pointer(a: np.ndarray) -> int:
    return a.ctypes.data


class CommVQTables(NamedTuple):
    """What ``velox_cpu_partial_commvq`` reads of a commvq key codec (built once per codec), all in
    the groups' layout (``commvq.pair_permutation``)."""

    u: np.ndarray            # [H·G, S, 16, Dg] float32: codeword parts U (t)
    v: np.ndarray            # [H·G, S, 16, Dg] float32: V = i·t
    perm: np.ndarray         # [D] int32: layout position -> model dim
    inv_scale: np.ndarray    # [H, D] float32: 1 / scale laid out (ones without one)


def commvq_tables(codec: PreRopeCodec) -> CommVQTables:
    return per_codec(codec, "cpu_commvq", _build_commvq_tables)


def _build_commvq_tables(codec: PreRopeCodec) -> CommVQTables:
    inner = codec.inner
    dense = lambda a: np.ascontiguousarray(np.array(a.astype(mx.float32)))
    inv_scale = np.ones((inner.heads, inner.perm.shape[0]), np.float32) if inner.scale is None else 1.0 / dense(inner.scale)
    return CommVQTables(u=dense(inner.U), v=dense(inner.V), perm=np.ascontiguousarray(inner.perm.astype(np.int32)),
                        inv_scale=np.ascontiguousarray(inv_scale[:, inner.perm].astype(np.float32)))


_LAID_OUT: dict[tuple, tuple[mx.array, np.ndarray]] = {}


def laid_out_cos_sin(rope, n: int, perm: Optional[np.ndarray] = None) -> np.ndarray:
    """``cos_sin_table(rope, n)`` as the kernels read it, rebuilt only when that table grows (a
    per-call copy would cost as much as the scores): with perm, [≥ n, D] with its columns in
    perm's order (commvq reads one row per token); without, transposed to [D, ≥ n] (the tile
    kernels read TT consecutive positions per dim)."""
    table = cos_sin_table(rope, n)
    key = (rope.fingerprint, None if perm is None else perm.tobytes())
    held = _LAID_OUT.get(key)
    if held is None or held[0] is not table:
        held = (table, np.ascontiguousarray(np.array(table)[:, perm] if perm is not None else np.array(table).T))
        _LAID_OUT[key] = held
    return held[1]


class DenseTables(NamedTuple):
    """What ``velox_cpu_partial_dense`` reads of a pre-RoPE key codec in a basis that mixes RoPE
    pairs (spectral's full eigenbasis, vecinfer, rabitq), built once per codec; optional arrays
    are None."""

    kind: int                        # 0: per-dim codes through layout; 1: product VQ
    klev: np.ndarray                 # kind 0: [H, D, K] levels; kind 1: [H, M, dsub, K] codebooks
    layout: Optional[np.ndarray]     # kind 0: [H, D, 3] int32 word, shift, width
    rotation: Optional[np.ndarray]   # [H or 1, D, D]: x = rotation · y per key; None: Hadamard
    rowscale: Optional[np.ndarray]   # [D] with the Hadamard: its signs / √D
    centroids: Optional[np.ndarray]  # [H, D, C] added per token (rabitq), transposed
    colscale: Optional[np.ndarray]   # [H, D] times each dim after (vecinfer's smoothing, 1/scale)
    offset: Optional[np.ndarray]     # [H, D] added last (a mean)
    pairs: np.ndarray                # [D/2, 2] int32


def dense_tables(codec: PreRopeCodec) -> Optional[DenseTables]:
    """The dense kernel's tables for this codec, or None where it takes no such inner codec."""
    return per_codec(codec, "cpu_dense", _build_dense_tables)


def _layout_array(layout, bits: np.ndarray, heads: int, D: int) -> np.ndarray:
    """[heads, D, 3] int32: word, shift and width of each code (a PackLayout and its widths)."""
    parts = [np.broadcast_to(np.array(a).astype(np.int32), (heads, D)) for a in (layout.word, layout.shift)]
    return np.ascontiguousarray(np.stack(parts + [np.broadcast_to(bits.astype(np.int32), (heads, D))], axis=-1))


def hadamard_signs(rotation: np.ndarray) -> Optional[np.ndarray]:
    """s / √D [D] when rotation [1, D, D] is diag(s) · H / √D (H Sylvester's Hadamard matrix, as
    ``rotation.randomized_hadamard`` builds), else None."""
    if rotation.shape[0] != 1:
        return None
    D = rotation.shape[-1]
    if D & (D - 1):
        return None
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < D:
        h = np.block([[h, h], [h, -h]])
    row = rotation[0, :, 0]  # s / √D (H's first column is ones)
    return np.ascontiguousarray(row) if np.allclose(rotation[0], row[:, None] * h, atol=1e-6) else None


def _build_dense_tables(codec: PreRopeCodec) -> Optional[DenseTables]:
    dense = lambda a: None if a is None else np.ascontiguousarray(np.array(a.astype(mx.float32)))
    inner = codec.inner
    pairs = np.ascontiguousarray(codec.rope.pairs.astype(np.int32))
    rotation = dense(getattr(inner, "rotation", None))
    if rotation is None or rotation.shape[-1] > MAX_D:
        return None
    rotation = rotation.reshape(-1, *rotation.shape[-2:])
    rowscale = hadamard_signs(rotation)
    if rowscale is not None:
        rotation = None
    if type(inner) is ScalarCodec and inner.levels.shape[-1] <= 256:
        H, D = inner.scale.shape
        return DenseTables(0, dense(inner.levels * inner.scale[..., None]), _layout_array(inner.layout, inner.bits, H, D),
                           rotation, rowscale, None, None, dense(inner.mean), pairs)
    if type(inner) is RaBitQCodec:
        H, C, D = inner.centroids.shape
        signs = np.broadcast_to(np.array([-1.0, 1.0]) / np.sqrt(D), (H, D, 2)).astype(np.float32)
        colscale = None if inner.scale is None else 1.0 / dense(inner.scale)
        return DenseTables(0, np.ascontiguousarray(signs), _layout_array(sign_layout(D), np.ones((1, D)), H, D),
                           rotation, rowscale, np.ascontiguousarray(dense(inner.centroids).transpose(0, 2, 1)),
                           colscale, None, pairs)
    if type(inner) is ProductCodec and inner.codebooks.shape[2] <= 256:
        books = np.ascontiguousarray(dense(inner.codebooks).transpose(0, 1, 3, 2))  # [H, M, dsub, K]
        return DenseTables(1, books, None, rotation, rowscale, None, dense(inner.smooth), None, pairs)
    return None


def coded_partial(q_key: tuple, kv: CompressedKV):
    """The coded tokens' partial for ``reference.attend``: the key codec's query basis (one query
    token: ScalarCodec's (q_rot, q_mean), PreRopeCodec's (q @ R, q, offset), q_rot [B, Hkv, R, D])
    -> (m, l [B, Hkv, R, 1], acc [B, Hkv, R, D])."""
    kc, vt = kv.key_codec, tables(kv.value_codec)
    rope = type(kc) is PreRopeCodec
    B, H, R, D = q_key[0].shape
    N, n = kv.values[1].shape[2], kv.n_coded
    offset = q_key[2] if rope else 0
    key_levels = [] if rope else [tables(kc).levels]
    q_mean = None if rope or q_key[1] is None else q_key[1].astype(mx.float32)
    inputs = [q_key[0].astype(mx.float32), *kv.keys, *kv.values, vt.levels, *key_levels]
    inputs += [] if q_mean is None else [q_mean]
    mx.eval(inputs)
    # the arrays' own memory (row-contiguous, evaluated): no copies
    q_np, *arrays = (np.ascontiguousarray(a) for a in inputs)
    nk = len(kv.keys)
    keys, (vw, vn, vl), rest = arrays[:nk], arrays[nk:nk + 3], arrays[nk + 3:]
    keys = [k.view(np.uint16) if k.dtype == np.float16 else k for k in keys]  # fp16 as its bits
    work = np.empty((B, H, R * n + R * D * TILE), np.float32)
    m, l, acc = np.empty((B, H, R, 1), np.float32), np.empty((B, H, R, 1), np.float32), np.empty((B, H, R, D), np.float32)
    P = _pointer
    common = [P(q_np)] + [P(k) for k in keys] + [P(vw), P(vn.view(np.uint16))]
    out = [P(vl), P(work), P(m), P(l), P(acc)]
    if rope and type(kc.inner) is not CommVQCodec:
        cs_t = laid_out_cos_sin(kc.rope, offset + n + TILE)
    if rope and type(kc.inner) is CommVQCodec:
        ct = commvq_tables(kc)
        cs_l = laid_out_cos_sin(kc.rope, offset + n, ct.perm)
        library().velox_cpu_partial_commvq(
            B, H, R, D, N, n, kc.inner.groups, kc.inner.codebooks.shape[1], vt.bits, offset, *common,
            P(ct.u), P(ct.v), P(ct.perm), P(ct.inv_scale), P(cs_l), *out)
    elif rope and _pair_basis(kc):
        rt = rope_tables(kc)
        library().velox_cpu_partial_rope(
            B, H, R, D, N, n, rt.levels.shape[-1], keys[0].shape[-1], vt.bits, offset, *common,
            P(rt.levels), P(rt.layout), P(rt.mean), P(cs_t), cs_t.shape[1], P(rt.pairs), *out)
    elif rope:
        dt = dense_tables(kc)
        opt = lambda a: None if a is None else P(a)
        norms = keys[-1] if keys[-1].dtype == np.uint16 else None
        ids = keys[1] if dt.centroids is not None else None
        K, wk, dsub = ((dt.klev.shape[3], dt.klev.shape[1], dt.klev.shape[2]) if dt.kind else
                       (dt.klev.shape[-1], keys[0].shape[-1], 1))
        library().velox_cpu_partial_dense(
            B, H, R, D, N, n, dt.kind, K, wk, dsub, 0 if ids is None else dt.centroids.shape[2],
            int(dt.rotation is not None and dt.rotation.shape[0] > 1), vt.bits, offset, P(q_np), P(keys[0]),
            opt(norms), opt(ids), P(vw), P(vn.view(np.uint16)), P(dt.klev), opt(dt.layout), opt(dt.rotation),
            opt(dt.rowscale), opt(dt.centroids), opt(dt.colscale), opt(dt.offset), P(cs_t), cs_t.shape[1], P(dt.pairs),
            *out)
    else:
        kw, kn = keys
        library().velox_cpu_partial(
            B, H, R, D, N, n, tables(kc).bits, vt.bits, P(q_np), None if q_mean is None else P(rest[1]),
            P(kw), P(kn), P(vw), P(vn.view(np.uint16)), P(rest[0]), *out)
    return mx.array(m), mx.array(l), mx.array(acc)


def decode(queries: mx.array, kv: CompressedKV, scale: float, sinks: Optional[mx.array] = None) -> mx.array:
    """Attention of one query token over a cache of coded tokens: the reference's query rotation,
    sinks and output around this module's partial. queries [B, Hq, 1, D] -> [B, Hq, 1, D]."""
    return reference.attend(queries, kv, scale=scale, sinks=sinks, coded_partial=coded_partial)
