import mlx.core as mx
import numpy as np
import pytest

from velox.methods.scalar import (PackLayout, fit_levels, gaussian_distortion, lloyd_max, pack,
                                  sphere_levels, unpack)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_round_trip_with_per_head_widths_and_straddling(seed):
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 9, size=(3, 64))  # widths 0..8, so codes cross word boundaries
    layout = PackLayout.from_bits(bits)
    assert layout.words == int(np.ceil(bits.sum(axis=1).max() / 32))
    codes = mx.array(rng.integers(0, 1 << 30, size=(2, 3, 7, 64)).astype(np.uint32)) & layout.mask[:, None, :]
    words = pack(codes, layout)
    assert words.dtype == mx.uint32 and words.shape == (2, 3, 7, layout.words)
    assert mx.array_equal(unpack(words, layout), codes)


def test_pack_is_dense():
    layout = PackLayout.from_bits(np.full((1, 64), 3))
    assert layout.words == 6  # 192 bits exactly


def test_gaussian_lloyd_max_distortion_matches_known_values():
    # Max (1960): 1 bit 0.3634, 2 bits 0.1175, 3 bits 0.03454.
    assert gaussian_distortion(1) == pytest.approx(0.3634, abs=2e-4)
    assert gaussian_distortion(2) == pytest.approx(0.1175, abs=2e-4)
    assert gaussian_distortion(3) == pytest.approx(0.03454, abs=2e-4)


def test_sphere_levels_are_symmetric_and_near_gaussian():
    lv = np.array(sphere_levels(2, 64))
    assert np.all(np.diff(lv) > 0)
    assert np.allclose(lv, -lv[::-1], atol=1e-3)
    # N(0,1) 2-bit Lloyd-Max levels are ±0.4528, ±1.510; the sphere's are a bit tighter.
    assert lv[3] == pytest.approx(1.510, abs=0.03)


def test_fit_levels_finds_clusters():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-5, 0.1, 1000), rng.normal(5, 0.1, 1000)])
    assert np.allclose(fit_levels(x, 1), [-5, 5], atol=0.05)


def test_lloyd_max_uniform_density():
    grid = np.linspace(0, 1, 100001)
    lv = lloyd_max(grid, np.ones_like(grid), 2)
    assert np.allclose(lv, [0.125, 0.375, 0.625, 0.875], atol=1e-3)
