"""turboquant_prod, turboquant_rvq, polar, qjl: the data-free methods of issue 5."""

import math

import mlx.core as mx
import numpy as np
import pytest

from velox.methods import polar, qjl, turboquant_mse, turboquant_prod, turboquant_rvq
from velox.methods.base import LayerSpec
from velox.methods.qjl import QJLCodec, sketch_matrix

DATA_FREE = [turboquant_prod, turboquant_rvq, polar, qjl]


def spec(bits, heads=3, dim=64, layer=0):
    return LayerSpec(layer=layer, num_kv_heads=heads, head_dim=dim, key_bits=bits, value_bits=bits)


def rel_mse(x, xh):
    return (mx.sum((x - xh) ** 2) / mx.sum(x ** 2)).item()


X = mx.random.normal((1, 3, 1000, 64), key=mx.random.key(1))


@pytest.mark.parametrize("module", DATA_FREE, ids=lambda m: m.__name__.split(".")[-1])
def test_one_token_at_a_time_equals_whole_prompt_and_bytes_are_bits_plus_scalars(module):
    b = 3
    keys, values = module.make_codecs({}, spec(b))
    x = X[:, :, :12]
    whole = keys.encode(x)
    steps = [keys.encode(x[:, :, i:i + 1]) for i in range(12)]
    for part, pieces in zip(whole, zip(*steps)):
        assert mx.array_equal(part, mx.concatenate(pieces, axis=2))
    per_vector = sum(p.nbytes for p in whole) / (3 * 12)
    norms = 4 if module is turboquant_prod else 2  # prod also keeps the residual's norm
    assert per_vector == 64 * b / 8 + norms
    assert values.decode(*values.encode(x)).shape == x.shape


@pytest.mark.parametrize("module,bits,hi", [(polar, 2, 0.13), (polar, 3, 0.037), (polar, 4, 0.0095),
                                            (turboquant_rvq, 2, 0.14), (turboquant_rvq, 4, 0.028),
                                            (turboquant_rvq, 6, 0.0065)])
def test_reconstruction_error_near_scalar_lloyd_max(module, bits, hi):
    codec = module.make_codecs({}, spec(bits))[0]
    err = rel_mse(X, codec.decode(*codec.encode(X)))
    assert err < hi
    # more bits, less error
    assert rel_mse(X, (c := module.make_codecs({}, spec(bits + 1))[0]).decode(*c.encode(X))) < err


def test_rvq_second_stage_halves_the_error_of_the_first():
    one = turboquant_mse.make_codec(3, 64, 2, seed=0)
    two = turboquant_rvq.make_codec(64, 4, seed=0)  # 2 + 2 bits
    assert rel_mse(X, two.decode(*two.encode(X))) < 0.3 * rel_mse(X, one.decode(*one.encode(X)))


def test_polar_level_bits_use_the_budget_and_favour_level_one():
    for b in (2, 3, 4):
        alloc = polar.allocate_level_bits(64, b)
        used = sum((64 >> (i + 1)) * a for i, a in enumerate(alloc))
        assert b * 64 - 8 < used <= b * 64 and alloc[0] == max(alloc[:-1])


@pytest.mark.parametrize("make", [
    lambda seed: turboquant_prod.ProdCodec(turboquant_mse.make_codec(1, 64, 1, seed), QJLCodec(sketch_matrix(64, 64, seed))),
    lambda seed: QJLCodec(sketch_matrix(64, 128, seed)),
], ids=["turboquant_prod", "qjl"])
def test_inner_product_estimator_is_unbiased(make):
    # Over many independent sketches, the mean estimate of q·k matches q·k; a plain
    # (b-1)-bit MSE code alone is biased towards 0 (its slope is < 1).
    rng = np.random.default_rng(0)
    k = mx.array(rng.standard_normal((1, 1, 1, 64)).astype(np.float32))
    q = mx.array(rng.standard_normal((1, 1, 64, 64)).astype(np.float32)) + 0.5 * k[0, 0]
    true = (q @ k.swapaxes(-1, -2))[..., 0]
    est = []
    for seed in range(300):
        codec = make(seed)
        est.append((q @ codec.decode(*codec.encode(k)).swapaxes(-1, -2))[..., 0])
    est = mx.stack(est)
    err = est - true
    sem = mx.std(err, axis=0) / math.sqrt(len(est))
    z = mx.abs(mx.mean(err, axis=0)) / sem
    assert mx.mean(z).item() < 1.2 and mx.max(z).item() < 4.5  # |z| ~ half-normal, mean 0.8
    mse1 = turboquant_mse.make_codec(1, 64, 1, 0)
    slope = (mx.sum((q @ mse1.decode(*mse1.encode(k)).swapaxes(-1, -2))[..., 0] * true) / mx.sum(true * true)).item()
    assert slope < 0.9


def test_rotations_and_sketches_differ_per_layer_and_part():
    a, b = turboquant_prod.make_codecs({}, spec(3, layer=0))[0], turboquant_prod.make_codecs({}, spec(3, layer=1))[0]
    assert not mx.array_equal(a.qjl.sketch, b.qjl.sketch)
    assert not mx.array_equal(a.mse.rotation, b.mse.rotation)
    assert not mx.allclose(a.mse.rotation[0], turboquant_mse.make_codecs({}, spec(3))[1].rotation[0])


def test_outlier_channels_cut_error_when_a_few_channels_dominate():
    from velox.methods import outliers

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 3, 64)).astype(np.float32)
    x[..., [5, 37]] *= 30.0  # one RoPE pair (half-split pairing: 5 and 5 + 32) dominates
    pairs = np.stack([np.arange(32), np.arange(32) + 32], axis=1)
    t = outliers.fit(x, 2, pairs)
    assert np.array(t["keys.outlier_channels"]).tolist() == [[5, 37]] * 3
    s = LayerSpec(0, 3, 64, 2, 2)
    codec = outliers.key_codec(t, s, 2, lambda d: turboquant_mse.make_codecs({}, LayerSpec(0, 3, d, 2, 2))[0])
    xm = mx.array(x.transpose(1, 0, 2))[None]
    parts = codec.encode(xm)
    assert parts[0].dtype == mx.int8 and parts[0].shape == (1, 3, 2000, 2)
    plain = turboquant_mse.make_codecs({}, s)[0]
    err = lambda c: (mx.sum((c.decode(*c.encode(xm)) - xm)[..., [i for i in range(64) if i not in (5, 37)]] ** 2)).item()
    assert err(codec) < 0.2 * err(plain)  # the other channels no longer share the outliers' norm
    assert rel_mse(xm, codec.decode(*parts)) < 0.5 * rel_mse(xm, plain.decode(*plain.encode(xm)))
