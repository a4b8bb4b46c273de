import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from velox.methods import METHODS, get_method, spectral, turboquant_mse
from velox.methods.base import LayerActivations, LayerSpec, attention_mass


def rel_mse(x, xh):
    return (mx.sum((x - xh) ** 2) / mx.sum(x ** 2)).item()


@pytest.mark.parametrize("bits,lo,hi", [(2, 0.10, 0.13), (3, 0.030, 0.040), (4, 0.008, 0.011)])
def test_turboquant_mse_error_matches_lloyd_max_theory(bits, lo, hi):
    # Relative MSE of a rotated unit vector ≈ Gaussian Lloyd-Max distortion at `bits`.
    x = mx.random.normal((1, 3, 2000, 64), key=mx.random.key(1))
    codec = turboquant_mse.make_codec(3, 64, bits, seed=0)
    words, norms = codec.encode(x)
    assert words.shape == (1, 3, 2000, bits * 2) and words.dtype == mx.uint32
    assert lo < rel_mse(x, codec.decode(words, norms)) < hi


def test_encoding_one_token_at_a_time_equals_whole_prompt():
    x = mx.random.normal((1, 3, 16, 64), key=mx.random.key(2))
    codec = turboquant_mse.make_codec(3, 64, 3, seed=5)
    whole = codec.encode(x)
    steps = [codec.encode(x[:, :, i : i + 1]) for i in range(16)]
    for part, pieces in zip(whole, zip(*steps)):
        assert mx.array_equal(part, mx.concatenate(pieces, axis=2))


def test_randomized_hadamard_is_orthogonal_and_seeded():
    from velox.methods.rotation import randomized_hadamard

    r = randomized_hadamard(64, 3)
    assert mx.allclose(r @ r.T, mx.eye(64), atol=1e-5)
    assert mx.array_equal(r, randomized_hadamard(64, 3))
    assert not mx.array_equal(r, randomized_hadamard(64, 4))
    odd = randomized_hadamard(48, 0)  # 48 = 12·4 is supported; 50 falls back to QR
    assert mx.allclose(odd @ odd.T, mx.eye(48), atol=1e-5)
    for n in (50, 60):  # 60: MLX 0.32 corrupts the heap instead of refusing it (kv-outliers 4 at D 64)
        q = randomized_hadamard(n, 0)
        assert mx.allclose(q @ q.T, mx.eye(n), atol=1e-5)


def test_allocate_bits_spends_exact_budget_where_variance_is():
    var = np.array([16.0, 4.0, 1.0, 0.25, 0.01, 0.001])
    bits = spectral.allocate_bits(var, 12, max_bits=8)
    assert bits.sum() == 12
    assert np.all(np.diff(bits) <= 0)  # more variance, more bits
    assert bits[0] > bits[-1]


def anisotropic(n, heads=2, dim=64, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((dim, dim)) * np.exp(-np.arange(dim) / 8)[None]
    return (rng.standard_normal((n, heads, dim)) @ a.T + 2.0).astype(np.float32)


def test_spectral_beats_data_free_rotation_on_anisotropic_data():
    data = anisotropic(4500)
    x, held_out = data[:4000], data[4000:]
    tensors = spectral.fit(x, bits=3)
    codec = spectral.codec_from_tensors(tensors)
    assert np.array(tensors["bits"]).sum(axis=1).tolist() == [192, 192]
    test = mx.array(held_out).transpose(1, 0, 2)[None]
    err_spectral = rel_mse(test, codec.decode(*codec.encode(test)))
    tq = turboquant_mse.make_codec(2, 64, 3, seed=0)
    err_tq = rel_mse(test, tq.decode(*tq.encode(test)))
    assert err_spectral < 0.5 * err_tq


def test_attention_mass_sums_to_query_count():
    rng = np.random.default_rng(0)
    n, hq, hk, d = 32, 4, 2, 16
    acts = LayerActivations(
        keys=rng.standard_normal((n, hk, d)).astype(np.float16), keys_pre_rope=None,
        values=None,
        queries=rng.standard_normal((n, hq, d)).astype(np.float16),
        positions=np.tile(np.arange(16), 2))
    mass = attention_mass(acts)
    # Each query spreads 1.0 over the keys of its own sequence; 2 queries per KV head.
    assert mass.shape == (n, hk)
    assert np.allclose(mass.sum(axis=0), n * hq / hk)
    assert mass[0].min() > mass[15].max()  # the first key is seen by every query


def test_spectral_calibrate_and_codecs_round_trip():
    x = anisotropic(1024)
    rng = np.random.default_rng(0)
    acts = LayerActivations(keys=x, keys_pre_rope=x, values=x[:, ::-1].copy(),
                            queries=rng.standard_normal((1024, 4, 64)).astype(np.float32),
                            positions=np.tile(np.arange(512), 2))
    spec = LayerSpec(layer=0, num_kv_heads=2, head_dim=64, key_bits=4, value_bits=2)
    tensors = spectral.calibrate(acts, spec)
    assert sorted(tensors) == [f"keys.{p}" for p in sorted(spectral.PARTS)]
    flat, _ = spectral.make_codecs(tensors, spec)  # no rope module (a NoPE layer): keys coded as they come
    k0 = mx.array(x[:5]).transpose(1, 0, 2)[None]
    assert all(mx.array_equal(a, b).item() for a, b in zip(flat.encode(k0, offset=0), flat.encode(k0, offset=7)))
    rope = nn.RoPE(64, base=10000.0)
    kc, vc = spectral.make_codecs(tensors, LayerSpec(0, 2, 64, 4, 2, rope=rope))
    assert kc.inner.bits_per_vector == 256 and vc.bits_per_vector == 128
    # keys are coded before RoPE: the same key at two positions codes identically
    k = mx.array(x[:5]).transpose(1, 0, 2)[None]
    at0 = kc.encode(rope(k, offset=0), offset=0)
    at900 = kc.encode(rope(k, offset=900), offset=900)
    assert all(mx.array_equal(a, b) for a, b in zip(at0[:1], at900[:1]))
    back = kc.decode(*at900, offset=900)
    assert rel_mse(rope(k, offset=900), back) < 0.02


def test_unknown_method_lists_available():
    with pytest.raises(ValueError, match="available: commvq, polar, qjl, rabitq, spectral, turboquant_mse, turboquant_prod, turboquant_rvq, vecinfer"):
        get_method("nope")
    assert set(METHODS) >= {"spectral", "turboquant_mse"}


def test_spectral_pair_basis_commutes_with_rope():
    """basis="pairs": rotations within RoPE pairs only, so the basis commutes with RoPE at every
    position (what lets attention move the query into it once); it still codes keys."""
    rope = nn.RoPE(64, base=10000.0)
    spec = LayerSpec(layer=0, num_kv_heads=2, head_dim=64, key_bits=4, value_bits=4, rope=rope)
    x = anisotropic(1024)
    rng = np.random.default_rng(0)
    acts = LayerActivations(keys=x, keys_pre_rope=x, values=x, queries=rng.standard_normal((1024, 4, 64)).astype(np.float32),
                            positions=np.tile(np.arange(512), 2))
    tensors = spectral.calibrate(acts, spec, basis="pairs")
    basis = tensors["keys.basis"]  # [H, D, D]
    y = mx.random.normal((1, 2, 5, 64), key=mx.random.key(3))
    turn = lambda v: mx.einsum("bhld,hed->bhle", v, basis)  # basisᵀ · v per head
    for offset in (0, 17, 900):
        assert mx.allclose(rope(turn(y), offset=offset), turn(rope(y, offset=offset)), atol=1e-5)
    assert mx.allclose(mx.einsum("hde,hdf->hef", basis, basis), mx.broadcast_to(mx.eye(64), (2, 64, 64)), atol=1e-5)
    kc, _ = spectral.make_codecs(tensors, spec)
    k = rope(mx.array(x[:8]).transpose(1, 0, 2)[None])
    rel = mx.linalg.norm(kc.decode(*kc.encode(k)) - k) / mx.linalg.norm(k)
    assert rel.item() < 0.2
    with pytest.raises(ValueError, match="basis must be one of"):
        spectral.calibrate(acts, spec, basis="diagonal")
