"""The calibrated vector-quantization methods: vecinfer, rabitq, commvq (and their k-means)."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from velox.format import VeloxFormatError
from velox.methods import commvq, rabitq, turboquant_mse, vecinfer
from velox.methods.base import LayerActivations, LayerSpec
from velox.methods.rope import RopeInverse
from velox.methods.rotation import randomized_hadamard
from velox.methods.vq import kmeans

H, D = 2, 64


def rel_mse(x, xh):
    return (mx.sum((x - xh) ** 2) / mx.sum(x ** 2)).item()


def key_like(n, seed=0):
    """Anisotropic keys with a mean, like real pre-RoPE keys: [n, H, D]."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((D, D)) * np.exp(-np.arange(D) / 12)[None]
    return (rng.standard_normal((n, H, D)) @ a.T + 1.5).astype(np.float32)


@pytest.fixture(scope="module")
def acts():
    n = 2048
    k = key_like(n + 256)[:n]
    q = np.random.default_rng(1).standard_normal((n, 2 * H, D)).astype(np.float16)
    return LayerActivations(keys=k.astype(np.float16), keys_pre_rope=k.astype(np.float16),
                            values=k.astype(np.float16), queries=q, positions=np.arange(n) % 512)


def spec(bits, rope=None):
    return LayerSpec(layer=0, num_kv_heads=H, head_dim=D, key_bits=bits, value_bits=4, seed=0,
                     rope=rope or nn.RoPE(D))


def held_out():
    return mx.array(key_like(2048 + 256)[2048:]).transpose(1, 0, 2)[None]  # [1, H, 256, D] pre-RoPE


def test_kmeans_finds_separated_clusters_and_honours_weights():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([c + 0.1 * rng.standard_normal((300, 2)) for c in centres]).astype(np.float32)
    cent, labels = kmeans(x, 3, seed=0)
    assert np.abs(np.sort(cent[:, 0]) - np.sort(centres[:, 0])).max() < 0.1
    assert len(set(labels[:300])) == 1 and len(set(labels)) == 3
    # One centroid for two clusters: the heavy cluster pulls it.
    two = x[:600]
    w = np.r_[np.full(300, 9.0), np.ones(300)]
    cent1, _ = kmeans(two, 1, weights=w)
    assert abs(cent1[0, 0] - 1.0) < 0.1  # 0.9·0 + 0.1·10


@pytest.mark.parametrize("module,bits", [(vecinfer, 2), (vecinfer, 1), (rabitq, 1), (commvq, 2), (commvq, 1)])
def test_one_token_at_a_time_equals_whole_prompt_and_bytes_match(acts, module, bits):
    s = spec(bits)
    kc, vc = module.make_codecs(module.calibrate(acts, s), s)
    x = nn.RoPE(D)(held_out()[:, :, :16], offset=100)  # post-RoPE, as the cache receives them
    whole = kc.encode(x, offset=100)
    steps = [kc.encode(x[:, :, i:i + 1], offset=100 + i) for i in range(16)]
    for part, pieces in zip(whole, zip(*steps)):
        assert mx.array_equal(part, mx.concatenate(pieces, axis=2))
    per_vector = sum(p[0, 0, 0].nbytes for p in whole)
    expected = {vecinfer: D * bits // 8, rabitq: D // 8 + 1 + 2, commvq: D * bits // 8 + 2}[module]
    assert per_vector == expected
    assert rel_mse(x, kc.decode(*whole, offset=100)) < 0.5


@pytest.mark.parametrize("module,bits", [(vecinfer, 2), (commvq, 2)])
def test_calibrated_vq_beats_data_free_scalar_at_two_bits(acts, module, bits):
    s = spec(bits)
    kc, _ = module.make_codecs(module.calibrate(acts, s), s)
    x = held_out()
    err = rel_mse(x, kc.inner.decode(*kc.inner.encode(x)))
    tq = turboquant_mse.make_codec(H, D, bits, seed=0)
    assert err < 0.7 * rel_mse(x, tq.decode(*tq.encode(x)))


def test_commvq_more_bits_less_error_and_stages_reduce_error(acts):
    u = np.asarray(acts.keys_pre_rope, np.float32).transpose(1, 0, 2)
    u = u / np.linalg.norm(u, axis=-1, keepdims=True)
    _, errors = commvq.fit(u[:, :1024], bits=1, seed=0)
    assert len(errors) == D // 8 and all(b < a for a, b in zip(errors, errors[1:]))


def test_commvq_codebook_commutes_with_rope():
    # Rotating every stage codebook by RoPE's per-pair angle rotates every decoded key:
    # RoPE applied to decoded keys == keys decoded from RoPE-rotated codebooks.
    rope = RopeInverse(nn.RoPE(D), D)
    G = commvq.groups(D)
    perm = commvq.pair_permutation(rope, G)
    rng = np.random.default_rng(0)
    books = rng.standard_normal((H, G, 4, commvq.HALF, D // G)).astype(np.float32)
    codes = mx.array(rng.integers(0, 256, (5, H, 1, 4 * G)).astype(np.uint8))  # 5 keys, one position
    norms = mx.ones((5, H, 1), mx.float16)
    pos = 37
    theta = np.array(rope_angles(rope, pos)).reshape(G, 1, 1, -1)  # per group's pairs
    P = D // G // 2
    z = books[..., :P] + 1j * books[..., P:]
    zr = z * np.exp(1j * theta)
    rotated = np.concatenate([zr.real, zr.imag], -1).astype(np.float32)
    plain = commvq.CommVQCodec(mx.array(books), perm).decode(codes, norms)
    turned = commvq.CommVQCodec(mx.array(rotated), perm).decode(codes, norms)
    assert mx.allclose(rope.rope(plain, offset=pos), turned, atol=1e-4)


def rope_angles(rope, pos):
    """RoPE's rotation angle of each pair at position ``pos``, probed from the module."""
    e = np.zeros((1, 1, 1, D), np.float32)
    e[..., rope.pairs[:, 0]] = 1.0
    out = np.array(rope.rope(mx.array(e), offset=pos))[0, 0, 0]
    return np.arctan2(out[rope.pairs[:, 1]], out[rope.pairs[:, 0]])


def test_commvq_m_step_recovers_a_structured_codebook():
    rng = np.random.default_rng(0)
    K, P = commvq.HALF, 8
    t = rng.standard_normal((1, K, 2 * P)).astype(np.float32)
    U, V = commvq.codeword_parts(t)
    centres = U[0][:, None] + V[0][None, :]                       # [K, K, 2P]
    W = rng.uniform(0.5, 2.0, (1, K, K))
    S = W[..., None] * centres[None]                               # Σ_n s·z for exact data
    got = commvq._project(W, S.sum(2)[..., :P], S.sum(2)[..., P:], S.sum(1)[..., :P], S.sum(1)[..., P:])
    assert np.allclose(got, t, atol=1e-3)


def test_rabitq_estimator_is_unbiased_and_within_the_papers_bound():
    rng = np.random.default_rng(0)
    n, d = 4000, 64
    codec = rabitq.RaBitQCodec(mx.zeros((1, 1, d)), randomized_hadamard(d, 3))
    o = rng.standard_normal((n, d)).astype(np.float32)
    o /= np.linalg.norm(o, axis=1, keepdims=True)
    q = rng.standard_normal((n, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    (words, ids, factor), ip = codec.encode_with_ip(mx.array(o)[None, None])
    est = mx.sum(codec.decode(words, ids, factor)[0, 0] * mx.array(q), axis=-1)
    # the estimate straight from the bits equals q·decode (what attention computes)
    from_bits = mx.stack([codec.inner_products(mx.array(q[i:i + 1])[None, None], words[:, :, i:i + 1],
                                                ids[:, :, i:i + 1], factor[:, :, i:i + 1])[0, 0, 0, 0]
                          for i in range(50)])
    assert mx.allclose(from_bits, est[:50], atol=2e-3)
    err = np.array(est) - np.sum(o * q, axis=1)
    ip = np.array(ip[0, 0])
    assert abs(err.mean()) < 4 * err.std() / math.sqrt(n)            # unbiased
    bound = np.sqrt((1 - ip ** 2) / ip ** 2) * 1.9 / math.sqrt(d - 1)
    assert np.mean(np.abs(err) <= bound) > 0.93
    # the plain sign reconstruction (without 1/⟨ō, o⟩) is biased towards 0 by ⟨ō, o⟩ ≈ 0.8
    plain = np.array(est) * ip
    slope = np.sum(plain * np.sum(o * q, 1)) / np.sum(np.sum(o * q, 1) ** 2)
    assert slope < 0.85


def test_rabitq_query_scaling_keeps_scores_and_codes_ids(acts):
    s = spec(1)
    t = rabitq.calibrate(acts, s, nlist=16)
    assert t["keys.centroids"].shape == (H, 16, D)
    scale = np.array(t["keys.scale"])
    rope = RopeInverse(s.rope, D)
    assert np.allclose(scale[:, rope.pairs[:, 0]], scale[:, rope.pairs[:, 1]])  # commutes with RoPE
    with pytest.raises(ValueError, match="nlist"):
        rabitq.calibrate(acts, s, nlist=300)


def test_artifact_shape_mismatch_names_the_tensor(acts):
    s = spec(2)
    t = vecinfer.calibrate(acts, s)
    t["keys.codebooks"] = t["keys.codebooks"][:, :, :100]
    with pytest.raises(VeloxFormatError, match="keys.codebooks"):
        vecinfer.make_codecs(t, s)
    with pytest.raises(VeloxFormatError, match="missing tensor 'keys.codebooks'"):
        commvq.make_codecs({}, s)
