"""velox vs its peers in one run: same model, same text, same teacher-forced protocol.

Peers (install them only in this script's environment: ``pip install -e ".[peers]"``):
- turboquant-mlx-full: ``make_turboquant_cache`` at k4/v4, k3/v3, k8/v3;
- veloxquant-mlx: ``turboquant_rvq`` (keys only: b bits per stage × 2 stages, values fp16)
  and ``vecinfer`` (calibrated with its own smoothing, Hadamard and k-means helpers).
- veloxquant-mlx's per-head quantizers, which its own ``KVCacheBuilder.for_model`` refuses for
  mlx_lm models (standalone caches) or which have no cache at all: run here by ``PeerCodec``
  inside a VeloxKVCache, keys and values (``tq_mse``, ``tq_prod``, ``tq_rvq``, ``polar``), keys
  only with velox turboquant_mse 4-bit values (``qjl``, ``rabitq``, ``commvq``).
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


# The fields of veloxquant-mlx's EncodedVector a quantizer may fill, in the order they are kept.
EV_FIELDS = ("indices", "signs", "norm", "residual_norm", "angles", "final_radius")


class PeerCodec:
    """veloxquant-mlx quantizers (one per KV head) as a velox key or value codec.

    Runs the peer's own encode/decode inside a VeloxKVCache so the same protocol applies. The
    cache's parts are exactly the arrays the peer's EncodedVector holds, in the peer's dtypes
    (polar ``angles``: one part per level), so ``cache.nbytes`` counts what the peer stores.
    Inputs are cast to fp16, what the peer's quantizers take (RaBitQ, fitted on fp32 keys,
    keeps fp32). CommVQ takes pre-RoPE keys plus positions and re-applies RoPE itself, so the
    keys the cache receives are un-rotated exactly first (velox's RopeInverse).
    norm_dtype: TurboQuant MSE/Prod/RVQ codebooks assume unit vectors (N(0, 1/d) after the
    rotation) and their EncodedVector carries no norm; the peer's own caches normalise and
    keep the norm beside the codes (fp32 in TurboQuantKVCache, bf16 in TurboQuantRVQKVCache),
    and so does this codec, as one more part of that dtype.
    """

    def __init__(self, quantizers, kind: str, rope=None, norm_dtype=None):
        self.quantizers, self.kind, self.rope, self.norm_dtype = quantizers, kind, rope, norm_dtype
        self.layout = []  # [(EncodedVector field, parts it takes or None for one array)], set by encode

    def encode(self, x, offset=0):
        x = x.astype(mx.float32)
        if self.kind == "comm_vq":
            x = self.rope.unrope(x, offset)
        if self.norm_dtype is not None:
            norm = mx.sqrt(mx.sum(x * x, axis=-1))
            x = x / mx.maximum(norm, 1e-6)[..., None]
        x = x if self.kind == "rabitq" else x.astype(mx.float16)
        pos = mx.arange(offset, offset + x.shape[2], dtype=mx.int32)
        evs = [q.encode(x[0, h], positions=pos) if self.kind == "comm_vq" else q.encode(x[0, h])
               for h, q in enumerate(self.quantizers)]
        parts, self.layout = [], []
        for f in EV_FIELDS:
            per_head = [getattr(e, f) for e in evs]
            if per_head[0] is None:
                continue
            n = len(per_head[0]) if isinstance(per_head[0], list) else None
            parts += [mx.stack(per_head)[None]] if n is None else \
                [mx.stack([a[j] for a in per_head])[None] for j in range(n)]
            self.layout.append((f, n))
        return tuple(parts) + ((norm.astype(self.norm_dtype),) if self.norm_dtype is not None else ())

    def decode(self, *parts, offset=0):
        from veloxquant_mlx.core.context import EncodedVector

        fields, i = {}, 0
        for f, n in self.layout:
            fields[f] = parts[i] if n is None else parts[i:i + n]
            i += 1 if n is None else n
        head = lambda v, h: v[0, h] if isinstance(v, mx.array) else [a[0, h] for a in v]
        outs = [q.decode(EncodedVector(quantizer_type=self.kind, batch_size=parts[0].shape[2], dim=64,
                                       **{f: head(v, h) for f, v in fields.items()}))
                for h, q in enumerate(self.quantizers)]
        out = mx.stack(outs)[None].astype(mx.float32)
        return out if self.norm_dtype is None else out * parts[-1].astype(mx.float32)[..., None]


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
        codecs.append((PeerCodec(qs, kind, rope), turboquant_mse.make_codecs({}, spec)[1]))
    return lambda: [VeloxKVCache(k, v, method=f"peer {kind}") for k, v in codecs]


# --peers name -> (EncodedVector kind, constructor(bits per element, seed), norm kept beside the codes
# (None: the quantizer carries its own scale), bits per element run, row label). Constructors as
# the peer's own caches call them: head dim 64, seed 42 + layer (KVCacheBuilder's), one quantizer
# per layer shared by its KV heads.
def _peer_quantizers():
    from veloxquant_mlx.quantizers import (PolarQuantizer, QJLQuantizer, TurboQuantMSE, TurboQuantProd,
                                           TurboQuantRVQ)

    return {
        # b-bit Lloyd-Max codes of the QR-rotated unit vector (TurboQuantKVCache: fp32 norm).
        "tq_mse": ("turboquant_mse", lambda b, s: TurboQuantMSE(d=64, b=b, seed=s), mx.float32, (2, 3, 4),
                   "veloxquant-mlx TurboQuantMSE"),
        # (b-1)-bit MSE codes + QJL signs of the residual, m = 64 (its m_default at d = 64): b bits.
        # decode = x_mse + ‖r‖·√(π/2)/m·Sᵀ·sign(S·r), whose dot with q is its unbiased estimator.
        "tq_prod": ("turboquant_prod", lambda b, s: TurboQuantProd(d=64, b=b, seed=s), mx.float32, (2, 3, 4),
                    "veloxquant-mlx TurboQuantProd"),
        # Its b is bits per stage, 2 stages: b = bits/2, so only even totals (2 = b1, 4 = b2).
        # Hadamard rotation and a bf16 norm, as its TurboQuantRVQKVCache.
        "tq_rvq": ("turboquant_rvq", lambda b, s: TurboQuantRVQ(d=64, b=b // 2, seed=s, use_hadamard=True),
                   mx.bfloat16, (2, 4), "veloxquant-mlx TurboQuantRVQ (2 stages of bits/2)"),
        # b-bit angle codes at 4 levels (60 per vector) + 4 fp16 radii (1 more bit per element).
        "polar": ("polar", lambda b, s: PolarQuantizer(d=64, b=b, seed=s), None, (2, 3, 4),
                  "veloxquant-mlx PolarQuantizer (4 levels, +4 fp16 radii)"),
        # 1 sign bit per JL projection, m = bits·64, + fp16 norm; keys only (see peer_quantizer_caches).
        "qjl": ("qjl", lambda b, s: QJLQuantizer(d=64, m=64 * b, seed=s), None, (2, 3, 4),
                "veloxquant-mlx QJLQuantizer (keys, m = bits·64; values velox tq 4-bit)"),
    }


def peer_quantizer_caches(model, kind: str, key_bits: int, value_bits: int):
    """veloxquant-mlx's own per-vector quantizers (``_peer_quantizers``) for keys and values.

    QJL keeps sign(S·k) and ‖k‖ only; its decode, ‖k‖·√(π/2)/m·Sᵀ·sign(S·k), is no
    reconstruction (squared error 1.5·‖k‖² at m = d, 0.4·‖k‖² at m = 4d: worse than zeros at
    m = d) but the vector whose dot with any query is exactly its asymmetric estimator
    √(π/2)/m·‖k‖·⟨S·q, sign(S·k)⟩ (``estimate_inner_product``). So it codes keys only,
    attention then scoring with QJL's estimator, and values are velox turboquant_mse 4-bit
    as in the rabitq row."""
    from velox.methods import turboquant_mse
    from velox.methods.base import LayerSpec
    from velox.runtime.cache import VeloxKVCache

    ev_kind, make_q, norm_dtype, _, _ = _peer_quantizers()[kind]
    H = model.args.num_key_value_heads
    codecs = []
    for i in range(len(model.layers)):
        qk = make_q(key_bits, 42 + i)
        key = PeerCodec([qk] * H, ev_kind, norm_dtype=norm_dtype)
        if kind == "qjl":
            spec = LayerSpec(layer=i, num_kv_heads=H, head_dim=64, key_bits=4, value_bits=value_bits)
            value = turboquant_mse.make_codecs({}, spec)[1]
        else:
            qv = qk if value_bits == key_bits else make_q(value_bits, 42 + i)
            value = PeerCodec([qv] * H, ev_kind, norm_dtype=norm_dtype)
        codecs.append((key, value))
    return lambda: [VeloxKVCache(k, v, method=f"peer {kind}") for k, v in codecs]


def main() -> None:
    reexec_with_openblas()
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--peers", default="turboquant,rvq,vecinfer",
                   help="peer caches to run, comma-separated: turboquant, rvq, vecinfer, rabitq, commvq, "
                        "tq_mse, tq_prod, tq_rvq, polar, qjl")
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
    for name, (_, _, _, bits, label) in _peer_quantizers().items():
        for b in bits if name in peers else ():
            vb = 4 if name == "qjl" else b
            rows.append(measure(model, tokens, label, peer_quantizer_caches(model, name, b, vb), args.windows, b, vb))
    write_outputs(args, rows, markdown(rows, header + " Peers run in the same process on the same tokens."))


if __name__ == "__main__":
    main()
