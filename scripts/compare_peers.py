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


# veloxquant-mlx's CommVQ EM at its defaults (50 iterations, 8192 samples) takes ~19 s per
# KV head on 2048 samples here, ~30 min for SmolLM2: cut to fit one run.
PEER_COMMVQ_EM_ITERS = 10
PEER_COMMVQ_SAMPLES = 1024


class PeerKeyCodec:
    """A veloxquant-mlx quantizer (one per KV head) as a velox key codec.

    veloxquant-mlx ships RaBitQ and CommVQ as standalone quantizers without a KV cache;
    this runs its own encode/decode inside a VeloxKVCache so the same protocol applies.
    Its CommVQ takes pre-RoPE keys plus positions and re-applies RoPE itself, so the
    keys the cache receives are un-rotated exactly first (velox's RopeInverse).
    """

    def __init__(self, quantizers, kind: str, rope=None):
        self.quantizers, self.kind, self.rope = quantizers, kind, rope

    def encode(self, x, offset=0):
        L = x.shape[2]
        pos = mx.arange(offset, offset + L, dtype=mx.int32)
        if self.kind == "comm_vq":
            x = self.rope.unrope(x.astype(mx.float32), offset)
        evs = [q.encode(x[0, h], positions=pos) if self.kind == "comm_vq" else q.encode(x[0, h])
               for h, q in enumerate(self.quantizers)]
        return (mx.stack([mx.array(e.indices) for e in evs])[None],
                mx.stack([mx.array(e.norm).astype(mx.float32) for e in evs])[None])

    def decode(self, indices, norm, offset=0):
        from veloxquant_mlx.core.context import EncodedVector

        D, L = 64, indices.shape[2]
        outs = [q.decode(EncodedVector(quantizer_type=self.kind, batch_size=L, dim=D, indices=indices[0, h],
                                       norm=norm[0, h])) for h, q in enumerate(self.quantizers)]
        return mx.stack(outs)[None].astype(mx.float32)


def peer_vq_caches(model, acts, kind: str, key_bits: int):
    """veloxquant-mlx RaBitQ (nlist 64, post-RoPE keys: its design) or CommVQ (pre-RoPE keys,
    8-bit sub-codebooks, D·bits/8 of them) per (layer, KV head), fitted on velox's captured
    calibration keys; values: velox turboquant_mse 4-bit, the same as velox's rows."""
    from veloxquant_mlx.quantizers.comm_vq import CommVQQuantizer
    from veloxquant_mlx.quantizers.rabitq import RaBitQQuantizer

    from velox.methods import turboquant_mse
    from velox.methods.base import LayerSpec
    from velox.methods.rope import RopeInverse, layer_rope
    from velox.runtime.cache import VeloxKVCache

    codecs = []
    theta = float(getattr(model.args, "rope_theta", 10000.0))
    for i, a in enumerate(acts):
        qs = []
        for h in range(a.keys.shape[1]):
            if kind == "rabitq":
                q = RaBitQQuantizer(d=64, nlist=64, seed=42 + i)
                q.fit(mx.array(a.keys[:, h].astype(np.float32)))
            else:
                q = CommVQQuantizer(d=64, b=8, n_codebooks=64 * key_bits // 8, seed=42 + i, rope_base=theta,
                                    n_em_iters=PEER_COMMVQ_EM_ITERS)
                q.fit(mx.array(a.keys_pre_rope[:, h].astype(np.float32)), max_samples=PEER_COMMVQ_SAMPLES)
            qs.append(q)
        rope = RopeInverse(layer_rope(model, i), 64)
        spec = LayerSpec(layer=i, num_kv_heads=len(qs), head_dim=64, key_bits=4, value_bits=4)
        codecs.append((PeerKeyCodec(qs, kind, rope), turboquant_mse.make_codecs({}, spec)[1]))
    return lambda: [VeloxKVCache(k, v, method=f"peer {kind}") for k, v in codecs]


def main() -> None:
    reexec_with_openblas()
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--peers", default="turboquant,rvq,vecinfer", help="peer caches to run (comma-separated)")
    args = p.parse_args()
    model, tok, tokens, rows, header, acts = run_velox_and_baselines(args)
    from turboquant_mlx.layers.polar_kv_cache import make_turboquant_cache
    from veloxquant_mlx.cache.base import KVCacheBuilder, KVCacheConfig

    peers = args.peers.split(",")
    for kb, vb in ((4, 4), (3, 3), (8, 3)) if "turboquant" in peers else ():
        make = lambda kb=kb, vb=vb: [Measured(c) for c in make_turboquant_cache(model, k_bits=kb, v_bits=vb,
                                                                             group_size=64, seed=42)]
        rows.append(measure(model, tokens, "turboquant-mlx-full", make, args.windows, kb, vb))
    for b in (2, 1) if "rvq" in peers else ():
        make = lambda b=b: [Measured(c) for c in KVCacheBuilder.for_model(
            model, KVCacheConfig(method="turboquant_rvq", bit_width_inlier=b, seed=42))]
        rows.append(measure(model, tokens, "veloxquant-mlx turboquant_rvq (keys only)", make, args.windows, 2 * b, 16))
    from velox.convert.calib_data import load_calibration

    calib = load_calibration(tok, num_tokens=2048, seq_len=2048).tokens[0]
    for kb, vb in ((2, 4), (4, 4)) if "vecinfer" in peers else ():
        rows.append(measure(model, tokens, "veloxquant-mlx vecinfer", vecinfer_caches(model, calib, kb, vb),
                            args.windows, kb, vb))
    if "rabitq" in peers:
        rows.append(measure(model, tokens, "veloxquant-mlx RaBitQQuantizer (keys; values velox tq 4-bit)",
                            peer_vq_caches(model, acts, "rabitq", 1), args.windows, 1, 4))
    for kb in (2, 1) if "commvq" in peers else ():
        rows.append(measure(model, tokens, "veloxquant-mlx CommVQQuantizer (keys; values velox tq 4-bit)",
                            peer_vq_caches(model, acts, "comm_vq", kb), args.windows, kb, 4))
    write_outputs(args, rows, markdown(rows, header + " Peers run in the same process on the same tokens."))


if __name__ == "__main__":
    main()
