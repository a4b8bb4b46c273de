"""Exact RoPE inversion for any rope module of mlx_lm, and a codec wrapper that codes
keys in the pre-RoPE frame (the cache receives post-RoPE keys)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import numpy as np

PROBE_POSITIONS = (1, 37, 1000, 4096)


ROPE_NAMES = ("rope", "rotary_emb")  # mlx_lm's names for an attention's rope module (rotary_emb: qwen, plamo)


def find_rope(block) -> Optional[tuple[Any, str]]:
    """(module, attribute name) of a transformer block's rope module: the shallowest submodule
    with a non-None attribute of a ROPE_NAMES name (``self_attn.rope`` in most mlx_lm models,
    ``mixer.rotary_emb`` in plamo2's), or None if the block has none (learned or no
    positions, as gpt2's)."""
    found = [(name.count("."), name, m, attr) for name, m in block.named_modules()
             for attr in ROPE_NAMES if getattr(m, attr, None) is not None]
    if not found:
        return None
    _, _, owner, attr = min(found, key=lambda f: f[:2])
    return owner, attr


def layer_rope(model, layer: int):
    """The rope module of ``model.layers[layer]``, or None if it has none (see ``find_rope``)."""
    found = find_rope(model.layers[layer])
    return getattr(*found) if found else None


def rope_matrices(rope, positions, head_dim: int) -> np.ndarray:
    """M [P, D, D] with rope(k at position p) = M[p] @ k, probed from the module itself.

    positions: an int P (positions 0..P-1) or a sequence of positions. Probing with
    the identity handles any linear rope (plain, traditional, llama3, yarn with its
    mscale, partial rotary) without knowing its formula.
    """
    eye = mx.eye(head_dim, dtype=mx.float32)
    if isinstance(positions, int):
        probe = mx.broadcast_to(eye[:, None, None, :], (head_dim, 1, positions, head_dim))
        out = rope(probe, offset=0)  # out[b, 0, p, i] = M[p][i, b]
        return np.array(out[:, 0].astype(mx.float32)).transpose(1, 2, 0).astype(np.float64)
    return np.stack([np.array(rope(eye[:, None, None, :], offset=int(p))[:, 0, 0].astype(mx.float32)).T
                     for p in positions]).astype(np.float64)


class RopeInverse:
    """rope(x, offset) and its exact inverse for a pairwise-rotation rope module.

    Every mlx_lm rope rotates pairs of dimensions (times a constant mscale m), so with
    P = the sign flip of each pair's second member, rope⁻¹(x) = P·rope(P·x) / m².
    The pairing and m are read off the module by probing it, not assumed. ``rope=None``
    (a layer without one: NoPE layers, learned positions) is the identity, so its keys are
    pre-RoPE as they come and every pairing of dimensions commutes with it.
    """

    def __init__(self, rope: Any, head_dim: int):
        self.module = rope
        self.head_dim = head_dim
        if rope is None:
            self.pairs = np.arange(head_dim, dtype=np.int64).reshape(-1, 2)
            self.fingerprint = ("none", head_dim)
            return
        mats = rope_matrices(rope, PROBE_POSITIONS, head_dim)
        # ropes that turn the same at the probes are the same rope (layers share one cos/sin table)
        self.fingerprint = (type(rope).__name__, head_dim, np.round(mats, 6).tobytes())
        off = np.abs(mats).sum(axis=0) * (1 - np.eye(head_dim))
        sign = np.ones(head_dim, dtype=np.float32)
        pairs, unpaired = [], []
        for i in range(head_dim):
            j = int(np.argmax(off[:, i]))
            if off[j, i] > 1e-6 and j < i:
                sign[i] = -1.0  # the second member of the pair (j, i)
                pairs.append((j, i))
            elif off[j, i] <= 1e-6:
                unpaired.append(i)  # not rotated (partial rotary): any pairing commutes
        pairs += list(zip(unpaired[0::2], unpaired[1::2]))
        # [D/2, 2]: (first, second) of each rotated pair; rope(x)_first + i·rope(x)_second
        # = (x_first + i·x_second)·e^{iθ}, so a pair behaves as one complex number.
        self.pairs = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
        m0 = rope_matrices(rope, (0,), head_dim)[0]
        self.sign = mx.array(sign)
        self.inv_m2 = mx.array((1.0 / np.sum(m0 * m0, axis=0)).astype(np.float32))

    def rope(self, x: mx.array, offset: int) -> mx.array:
        """x [B, H, L, D] at positions offset.. -> rotated."""
        return x if self.module is None else self.module(x, offset=offset)

    def unrope(self, x: mx.array, offset: int) -> mx.array:
        """Inverse of ``rope``: x [B, H, L, D] -> pre-RoPE."""
        if self.module is None:
            return x
        return self.sign * self.module(self.sign * x, offset=offset) * self.inv_m2


_COS_SIN: dict[tuple, mx.array] = {}
COS_SIN_STEP = 4096


def cos_sin_table(rope: RopeInverse, n: int) -> mx.array:
    """[≥ n, D] float32: row p holds m·cos at each pair's first dim and m·sin at its second, for
    RoPE at position p, read off the module (any variant, its mscale included). One table per
    distinct rope (``fingerprint``), grown in steps of COS_SIN_STEP positions."""
    table = _COS_SIN.get(rope.fingerprint)
    if table is None or table.shape[0] < n:
        rows = -(-n // COS_SIN_STEP) * COS_SIN_STEP
        probe = np.zeros((1, 1, rows, rope.head_dim), np.float32)
        probe[..., rope.pairs[:, 0]] = 1.0
        table = mx.contiguous(rope.rope(mx.array(probe), 0)[0, 0].astype(mx.float32))
        mx.eval(table)
        _COS_SIN[rope.fingerprint] = table
    return table


def spec_rope(spec) -> RopeInverse:
    """The RopeInverse of a LayerSpec's rope module (the identity where the layer has none)."""
    return RopeInverse(spec.rope, spec.head_dim)


@dataclass
class PreRopeCodec:
    """Codes post-RoPE keys in the pre-RoPE frame: un-rotate on encode, re-rotate on decode."""

    inner: Any
    rope: RopeInverse

    def encode(self, x: mx.array, offset: int = 0) -> tuple:
        """x [B, H, L, D] post-RoPE at positions offset.. -> codes of the pre-RoPE keys."""
        return self.inner.encode(self.rope.unrope(x.astype(mx.float32), offset))

    def decode(self, *parts: mx.array, offset: int = 0) -> mx.array:
        """Codes of positions offset.. -> post-RoPE keys [B, H, L, D]."""
        return self.rope.rope(self.inner.decode(*parts), offset)


# ---------------------------------------------------------------- attention from the codes
#
# PreRopeCodec's functions for velox.kernels.reference. A key at position p decodes as
# k̂_p = RoPE_p(inner.decode(codes)), so a block of keys is decoded in the pre-RoPE frame, turned
# by RoPE at its positions and scored: the history is never decoded whole. Where the inner codec
# is a ScalarCodec whose rotation R turns only within RoPE's pairs (spectral's basis="pairs"; any
# R for a layer without RoPE), R commutes with RoPE_p, so
#     q · k̂_p = norm · (q @ R) · RoPE_p(levels ∘ scale) + q · RoPE_p(mean):
# the query is rotated once, and each key costs its lookups and a RoPE of D coordinates (no D×D
# rotation per key). commvq's codewords commute with RoPE by construction (its decode is lookups
# and sums). The CPU kernel takes both (velox.kernels.cpu); ``commutes_with_rope`` says which.


def commutes_with_rope(codec: PreRopeCodec) -> bool:
    """Whether a key costs O(D) in this codec's attention: a ScalarCodec inner codec whose
    rotation is 2×2 rotations within the rope's pairs (or any, for a layer without RoPE), or
    commvq's RoPE-commutative codebooks. Others decode D×D per key (a dense basis)."""
    from .scalar import ScalarCodec, per_codec

    if type(codec.inner).__name__ == "CommVQCodec":
        return True
    if type(codec.inner) is not ScalarCodec:
        return False
    return per_codec(codec, "commutes", lambda c: _pair_rotations(c.inner.rotation, c.rope))


def _pair_rotations(rotation: mx.array, rope: RopeInverse) -> bool:
    if rope.module is None:
        return True
    R = np.array(rotation.astype(mx.float32))  # [H, D, D]
    a, b = rope.pairs.T
    inside = np.zeros(R.shape[1:], bool)
    inside[a, a] = inside[b, b] = inside[a, b] = inside[b, a] = True
    return bool(np.abs(R[:, ~inside]).max(initial=0) < 1e-6 and np.allclose(R[:, a, a], R[:, b, b], atol=1e-6)
                and np.allclose(R[:, a, b], -R[:, b, a], atol=1e-6))


def _pair_scalar(codec: PreRopeCodec) -> bool:
    from .scalar import ScalarCodec

    return type(codec.inner) is ScalarCodec and commutes_with_rope(codec)


def query_basis(codec: PreRopeCodec, q: mx.array, offset: int) -> tuple:
    """q [B, H, n, D] float32 -> (q in the keys' scoring basis [B, H, n, D], q, offset): what
    ``key_scores`` takes (q @ R for a pair-basis ScalarCodec, q itself otherwise)."""
    q_basis = q @ codec.inner.rotation.astype(mx.float32) if _pair_scalar(codec) else q
    return q_basis, q, offset


def key_scores(codec: PreRopeCodec, q_basis: tuple, parts: tuple[mx.array, ...], a: int, b: int) -> mx.array:
    """q · k̂ for the coded tokens [a, b) of parts, at positions offset + a .. -> [B, H, n, b − a] float32."""
    from .scalar import code_levels

    q_rot, q, offset = q_basis
    inner = codec.inner
    block = tuple(p[:, :, a:b] for p in parts)
    if not _pair_scalar(codec):  # decode the block before RoPE, turn it, score it
        return q @ codec.rope.rope(inner.decode(*block), offset + a).swapaxes(-1, -2)
    words, norms = block
    y = code_levels(words, inner) * inner.scale[:, None, :]
    s = (q_rot @ codec.rope.rope(y, offset + a).swapaxes(-1, -2)) * norms[:, :, None].astype(mx.float32)
    if inner.mean is None:
        return s
    H, D = inner.mean.shape
    mean = codec.rope.rope(mx.broadcast_to(inner.mean.astype(mx.float32)[None, :, None, :], (1, H, b - a, D)),
                           offset + a)
    return s + q @ mean.swapaxes(-1, -2)
