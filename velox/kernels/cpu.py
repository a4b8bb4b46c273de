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
from typing import Optional

import mlx.core as mx
import numpy as np

from ..methods.scalar import ScalarCodec
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
    return lib


def supports(queries: mx.array, kv: CompressedKV, mask) -> bool:
    """Decode (L = 1, no mask) over ScalarCodec keys and values of one width each dividing 32
    (uint32 words, fp16 norms), head_dim ≤ 256, with the C library built."""
    B, Hq, L, D = queries.shape
    codecs = (kv.key_codec, kv.value_codec)
    if not (L == 1 and mask is None and kv.n_coded > 0 and D <= MAX_D):
        return False
    return (all(type(c) is ScalarCodec and tables(c).bits for c in codecs)
            and [p.dtype for p in kv.keys + kv.values] == [mx.uint32, mx.float16] * 2
            and Hq % kv.key_codec.levels.shape[0] == 0 and library() is not None)


def _pointer(a: np.ndarray) -> int:
    return a.ctypes.data


def coded_partial(q_rot: mx.array, q_mean: Optional[mx.array], kv: CompressedKV):
    """The coded tokens' partial for ``reference.attend``: q_rot [B, Hkv, R, D] (one query token,
    in the key basis), q_mean [B, Hkv, R, 1] or None -> (m, l [B, Hkv, R, 1], acc [B, Hkv, R, D])."""
    (kw, kn), (vw, vn) = kv.keys, kv.values
    kt, vt = tables(kv.key_codec), tables(kv.value_codec)
    B, H, R, D = q_rot.shape
    N, n = kn.shape[2], kv.n_coded
    q_rot = q_rot.astype(mx.float32)
    inputs = [q_rot, kw, kn, vw, vn, kt.levels, vt.levels] + ([] if q_mean is None else [q_mean.astype(mx.float32)])
    mx.eval(inputs)
    # the arrays' own memory (row-contiguous, evaluated): no copies
    q_np, kw_np, kn_np, vw_np, vn_np, kl_np, vl_np = (np.ascontiguousarray(a) for a in inputs[:7])
    qm_np = None if q_mean is None else np.ascontiguousarray(inputs[7])
    work = np.empty((B, H, R * n + R * D * TILE), np.float32)
    m, l, acc = np.empty((B, H, R, 1), np.float32), np.empty((B, H, R, 1), np.float32), np.empty((B, H, R, D), np.float32)
    library().velox_cpu_partial(
        B, H, R, D, N, n, kt.bits, vt.bits, _pointer(q_np), None if qm_np is None else _pointer(qm_np),
        _pointer(kw_np), _pointer(kn_np.view(np.uint16)), _pointer(vw_np), _pointer(vn_np.view(np.uint16)),
        _pointer(kl_np), _pointer(vl_np), _pointer(work), _pointer(m), _pointer(l), _pointer(acc))
    return mx.array(m), mx.array(l), mx.array(acc)


def decode(queries: mx.array, kv: CompressedKV, scale: float, sinks: Optional[mx.array] = None) -> mx.array:
    """Attention of one query token over a cache of coded tokens: the reference's query rotation,
    sinks and output around this module's partial. queries [B, Hq, 1, D] -> [B, Hq, 1, D]."""
    return reference.attend(queries, kv, scale=scale, sinks=sinks, coded_partial=coded_partial)
