"""Decode attention from ScalarCodec codes on the CPU: ``cpu_decode.c``, compiled on first use.

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
from ..methods.rope import PreRopeCodec, commutes_with_rope, cos_sin_table
from ..methods.scalar import ScalarCodec, per_codec
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
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        warnings.warn(f"velox: could not load {path}: {e}; CPU attention uses mx ops")
        return None
    lib.velox_cpu_partial.restype = None
    lib.velox_cpu_partial.argtypes = [ctypes.c_int] * 8 + [ctypes.c_void_p] * 12
    lib.velox_cpu_partial_rope.restype = None
    lib.velox_cpu_partial_rope.argtypes = [ctypes.c_int] * 10 + [ctypes.c_void_p] * 15
    lib.velox_cpu_partial_commvq.restype = None
    lib.velox_cpu_partial_commvq.argtypes = [ctypes.c_int] * 10 + [ctypes.c_void_p] * 16
    return lib


def supports(queries: mx.array, kv: CompressedKV, mask) -> bool:
    """Decode (L = 1, no mask), head_dim ≤ 256, with the C library built, over ScalarCodec values
    of one width dividing 32 (uint32 words, fp16 norms) and keys that are either such a
    ScalarCodec, or pre-RoPE keys in a basis that turns within RoPE pairs (``rope_tables``)."""
    B, Hq, L, D = queries.shape
    kc, vc = kv.key_codec, kv.value_codec
    if not (L == 1 and mask is None and kv.n_coded > 0 and D <= MAX_D):
        return False
    if type(kc) is PreRopeCodec and type(kc.inner) is CommVQCodec:
        keys_ok = kc.inner.codebooks.shape[2] == 16 and [p.dtype for p in kv.keys] == [mx.uint8, mx.float16]
        heads = kc.inner.heads
    elif type(kc) is PreRopeCodec:
        keys_ok = type(kc.inner) is ScalarCodec and commutes_with_rope(kc) and kc.inner.levels.shape[-1] <= 256
        heads = kc.inner.scale.shape[0]
    else:
        keys_ok = type(kc) is ScalarCodec and tables(kc).bits > 0
        heads = kc.levels.shape[0] if type(kc) is ScalarCodec else 0
    return (keys_ok and type(vc) is ScalarCodec and tables(vc).bits > 0
            and [p.dtype for p in kv.values] == [mx.uint32, mx.float16]
            and (type(kc) is PreRopeCodec or [p.dtype for p in kv.keys] == [mx.uint32, mx.float16])
            and heads and Hq % heads == 0 and library() is not None)


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
    layout = np.stack([np.array(a).astype(np.int32) for a in (inner.layout.word, inner.layout.shift)]
                      + [inner.bits.astype(np.int32)], axis=-1)
    mean = np.zeros(inner.scale.shape, np.float32) if inner.mean is None else np.array(
        (inner.mean[:, None, :] @ inner.rotation)[:, 0].astype(mx.float32))
    return RopeTables(levels=np.ascontiguousarray(np.array((inner.levels * inner.scale[..., None]).astype(mx.float32))),
                      layout=np.ascontiguousarray(layout), mean=np.ascontiguousarray(mean),
                      pairs=np.ascontiguousarray(codec.rope.pairs.astype(np.int32)))


def _pointer(a: np.ndarray) -> int:
    return a.ctypes.data


class CommVQTables(NamedTuple):
    """What ``velox_cpu_partial_commvq`` reads of a commvq key codec (built once per codec)."""

    u: np.ndarray          # [H·G, S, 16, Dg] float32: codeword parts U (t)
    v: np.ndarray          # [H·G, S, 16, Dg] float32: V = i·t
    inv_perm: np.ndarray   # [D] int32: model dim -> position in the groups' layouts
    inv_scale: np.ndarray  # [H, D] float32: 1 / scale (ones without one)
    pairs: np.ndarray      # [D/2, 2] int32: the rope's pairs


def commvq_tables(codec: PreRopeCodec) -> CommVQTables:
    return per_codec(codec, "cpu_commvq", _build_commvq_tables)


def _build_commvq_tables(codec: PreRopeCodec) -> CommVQTables:
    inner = codec.inner
    dense = lambda a: np.ascontiguousarray(np.array(a.astype(mx.float32)))
    inv_scale = np.ones((inner.heads, inner.perm.shape[0]), np.float32) if inner.scale is None else 1.0 / dense(inner.scale)
    return CommVQTables(u=dense(inner.U), v=dense(inner.V),
                        inv_perm=np.ascontiguousarray(np.argsort(inner.perm).astype(np.int32)),
                        inv_scale=np.ascontiguousarray(inv_scale.astype(np.float32)),
                        pairs=np.ascontiguousarray(codec.rope.pairs.astype(np.int32)))


def coded_partial(q_key: tuple, kv: CompressedKV):
    """The coded tokens' partial for ``reference.attend``: the key codec's query basis (one query
    token: ScalarCodec's (q_rot, q_mean), PreRopeCodec's (q @ R, q, offset), q_rot [B, Hkv, R, D])
    -> (m, l [B, Hkv, R, 1], acc [B, Hkv, R, D])."""
    (kw, kn), (vw, vn) = kv.keys, kv.values
    vt = tables(kv.value_codec)
    q_rot = q_key[0].astype(mx.float32)
    B, H, R, D = q_rot.shape
    N, n = kn.shape[2], kv.n_coded
    rope = type(kv.key_codec) is PreRopeCodec
    if rope:
        offset = q_key[2]
        cs = cos_sin_table(kv.key_codec.rope, offset + n)
        inputs = [q_rot, kw, kn, vw, vn, vt.levels, cs]
    else:
        q_mean = q_key[1]
        kt = tables(kv.key_codec)
        inputs = [q_rot, kw, kn, vw, vn, vt.levels, kt.levels] + ([] if q_mean is None else [q_mean.astype(mx.float32)])
    mx.eval(inputs)
    # the arrays' own memory (row-contiguous, evaluated): no copies
    q_np, kw_np, kn_np, vw_np, vn_np, vl_np, extra = (np.ascontiguousarray(a) for a in inputs[:7])
    work = np.empty((B, H, R * n + R * D * TILE), np.float32)
    m, l, acc = np.empty((B, H, R, 1), np.float32), np.empty((B, H, R, 1), np.float32), np.empty((B, H, R, D), np.float32)
    out = [_pointer(work), _pointer(m), _pointer(l), _pointer(acc)]
    kn_p, vn_p = _pointer(kn_np.view(np.uint16)), _pointer(vn_np.view(np.uint16))
    if rope and type(kv.key_codec.inner) is CommVQCodec:
        ct = commvq_tables(kv.key_codec)
        inner = kv.key_codec.inner
        library().velox_cpu_partial_commvq(
            B, H, R, D, N, n, inner.groups, inner.codebooks.shape[1], vt.bits, offset, _pointer(q_np), _pointer(kw_np),
            kn_p, _pointer(vw_np), vn_p, _pointer(ct.u), _pointer(ct.v), _pointer(ct.inv_perm), _pointer(ct.inv_scale),
            _pointer(extra), _pointer(ct.pairs), _pointer(vl_np), *out)
    elif rope:
        rt = rope_tables(kv.key_codec)
        library().velox_cpu_partial_rope(
            B, H, R, D, N, n, rt.levels.shape[-1], kw_np.shape[-1], vt.bits, offset, _pointer(q_np), _pointer(kw_np),
            kn_p, _pointer(vw_np), vn_p, _pointer(rt.levels), _pointer(rt.layout), _pointer(rt.mean), _pointer(extra),
            _pointer(rt.pairs), _pointer(vl_np), *out)
    else:
        qm_np = None if len(inputs) == 7 else np.ascontiguousarray(inputs[7])
        library().velox_cpu_partial(
            B, H, R, D, N, n, kt.bits, vt.bits, _pointer(q_np), None if qm_np is None else _pointer(qm_np),
            _pointer(kw_np), kn_p, _pointer(vw_np), vn_p, _pointer(extra), _pointer(vl_np), *out)
    return mx.array(m), mx.array(l), mx.array(acc)


def decode(queries: mx.array, kv: CompressedKV, scale: float, sinks: Optional[mx.array] = None) -> mx.array:
    """Attention of one query token over a cache of coded tokens: the reference's query rotation,
    sinks and output around this module's partial. queries [B, Hq, 1, D] -> [B, Hq, 1, D]."""
    return reference.attend(queries, kv, scale=scale, sinks=sinks, coded_partial=coded_partial)
