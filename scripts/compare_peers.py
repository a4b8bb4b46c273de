"""velox vs its peers in one run: same model, same text, same teacher-forced protocol.

Peers (install them only in this script's environment: ``pip install -e ".[peers]"``):
- turboquant-mlx-full: ``make_turboquant_cache`` at k4/v4, k3/v3, k8/v3;
- veloxquant-mlx: ``turboquant_rvq`` (keys only: b bits per stage × 2 stages, values fp16)
  and ``vecinfer`` (calibrated with its own smoothing, Hadamard and k-means helpers).
veloxquant-mlx's other KV methods (turboquant_mse/prod, polar, qjl, spectral) are
per-head objects its own ``KVCacheBuilder.for_model`` refuses for mlx_lm models, and
rabitq / comm_vq have no cache at all, so they are not in the table.
Bytes are measured from the arrays each cache holds (``nbytes`` where the cache
reports it the same way; otherwise every mx.array attribute of the cache).

    python scripts/compare_peers.py --markdown out/peers.md --json out/peers.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import (common_args, markdown, measure, run_velox_and_baselines,  # noqa: E402
                           write_outputs)

from velox.cpu import reexec_with_openblas  # noqa: E402


def held_bytes(cache) -> int:
    """Bytes of every mx.array a cache object holds (recursively through lists/tuples/attrs)."""
    seen, total = set(), 0
    stack = [cache]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, mx.array):
            total += x.nbytes
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif hasattr(x, "__dict__"):
            stack.extend(vars(x).values())
    return total


class Measured:
    """Wraps a peer cache so ``nbytes`` is what it really holds."""

    def __init__(self, inner):
        self.__dict__["inner"] = inner

    def __getattr__(self, name):
        if name == "nbytes":
            return held_bytes(self.inner)
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)

    def update_and_fetch(self, k, v):
        return self.inner.update_and_fetch(k, v)


def vecinfer_caches(model, calib_tokens: np.ndarray, key_bits: int, value_bits: int):
    """veloxquant-mlx VecInfer caches calibrated with its own helpers on our calibration text."""
    from mlx_lm.models.cache import KVCache
    from veloxquant_mlx.allocators.vecinfer import (apply_dual_transform_keys, calibrate_smooth_factors,
                                                    train_codebook, walsh_hadamard_matrix)
    from veloxquant_mlx.cache.base import KVCacheConfig, KVCacheFactory
    from veloxquant_mlx.cache.options import VecInferOptions

    geometry = {1: (8, 8), 2: (8, 4), 4: (8, 2)}  # (codebook bits, sub-vector dim)
    kcb, ksub = geometry[key_bits]
    vcb, vsub = geometry[value_bits]
    caches = [KVCache() for _ in model.layers]
    model(mx.array(calib_tokens[None]), cache=caches)
    H = walsh_hadamard_matrix(64)
    out = []
    for i, c in enumerate(caches):
        K, V = c.keys[..., : c.offset, :].astype(mx.float32), c.values[..., : c.offset, :].astype(mx.float32)
        smooth = calibrate_smooth_factors(K[0].transpose(1, 0, 2))
        k_tilde = apply_dual_transform_keys(K, smooth, H)
        cfg = KVCacheConfig(method="vecinfer", head_dim=64, seed=42 + i,
                            options=VecInferOptions(key_sub_dim=ksub, key_codebook_bits=kcb,
                                                    value_sub_dim=vsub, value_codebook_bits=vcb),
                            smooth_factors=smooth,
                            key_codebook=train_codebook(k_tilde.reshape(-1, ksub), 2**kcb, max_iter=10, seed=i),
                            value_codebook=train_codebook(V.reshape(-1, vsub), 2**vcb, max_iter=10, seed=i))
        out.append(cfg)
    return lambda: [Measured(KVCacheFactory.create(cfg)) for cfg in out]


def main() -> None:
    reexec_with_openblas()
    args = common_args(__doc__.splitlines()[0]).parse_args()
    model, tok, tokens, rows, header = run_velox_and_baselines(args)
    from turboquant_mlx.layers.polar_kv_cache import make_turboquant_cache
    from veloxquant_mlx.cache.base import KVCacheBuilder, KVCacheConfig

    for kb, vb in ((4, 4), (3, 3), (8, 3)):
        make = lambda kb=kb, vb=vb: [Measured(c) for c in make_turboquant_cache(model, k_bits=kb, v_bits=vb,
                                                                             group_size=64, seed=42)]
        rows.append(measure(model, tokens, "turboquant-mlx-full", make, args.windows, kb, vb))
    for b in (2, 1):
        make = lambda b=b: [Measured(c) for c in KVCacheBuilder.for_model(
            model, KVCacheConfig(method="turboquant_rvq", bit_width_inlier=b, seed=42))]
        rows.append(measure(model, tokens, "veloxquant-mlx turboquant_rvq (keys only)", make, args.windows, 2 * b, 16))
    from velox.convert.calib_data import load_calibration

    calib = load_calibration(tok, num_tokens=2048, seq_len=2048).tokens[0]
    for kb, vb in ((2, 4), (4, 4)):
        rows.append(measure(model, tokens, "veloxquant-mlx vecinfer", vecinfer_caches(model, calib, kb, vb),
                            args.windows, kb, vb))
    write_outputs(args, rows, markdown(rows, header + " Peers run in the same process on the same tokens."))


if __name__ == "__main__":
    main()
