"""RateQuant: distortion fits, water-filling, per-head widths in caches and folders."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

import velox
from velox.convert.cli import main as convert_main
from velox.methods import ratequant, turboquant_mse, vecinfer
from velox.methods.base import LayerSpec
from velox.runtime.cache import VeloxKVCache

CALIB = ["--calib-tokens", "256", "--calib-seq-len", "64", "--quiet"]


def test_fit_distortion_recovers_alpha_and_beta():
    bits = [1, 2, 3, 4]
    alpha, beta = np.array([[2.0, 0.5]]), np.array([[3.6, 5.3]])
    d = alpha[..., None] * beta[..., None] ** -np.array(bits, float)
    a, b = ratequant.fit_distortion(bits, d)
    assert np.allclose(a, alpha) and np.allclose(b, beta)


def test_allocate_spends_exactly_and_follows_each_units_own_curve():
    # Unit 0 starts worse but decays slowly; unit 1 decays fast. A shared β would give
    # unit 0 every extra bit; the per-unit curves split them by marginal gain.
    alpha, beta = np.array([1.0, 0.8, 0.01]), np.array([2.0, 8.0, 4.0])
    lo, hi = np.ones(3, int), np.full(3, 4)
    bits = ratequant.allocate(alpha, beta, lo, hi, 7)
    assert bits.sum() == 7 and bits[2] == 1 and bits[1] >= 2
    total = lambda b: float(np.sum(alpha * beta ** -b.astype(float)))
    for other in ([2, 4, 1], [3, 3, 1], [4, 2, 1], [2, 3, 2], [3, 2, 2]):
        assert total(bits) <= total(np.array(other)) + 1e-12
    with pytest.raises(ValueError, match="cannot spend 20 bits"):
        ratequant.allocate(alpha, beta, lo, hi, 20)


def test_head_group_codec_codes_each_head_at_its_own_width():
    spec = LayerSpec(layer=0, num_kv_heads=3, head_dim=64, key_bits=0, value_bits=0)
    keys, values = ratequant.make_mixed_codecs(turboquant_mse, {}, spec, [2, 4, 2], [3, 3, 1])
    x = mx.random.normal((1, 3, 20, 64), key=mx.random.key(0))
    parts = keys.encode(x)
    # bytes: heads 0 and 2 at 2 bits, head 1 at 4 bits (+ fp16 norm each)
    assert sum(p.nbytes for p in parts) == 20 * (2 * (16 + 2) + (32 + 2))
    got = keys.decode(*parts)
    for h, b in enumerate([2, 4, 2]):
        own = turboquant_mse.make_codecs({}, LayerSpec(0, 1, 64, b, b))[0]
        assert mx.allclose(got[:, h:h + 1], own.decode(*own.encode(x[:, h:h + 1])), atol=1e-5)
    cache = VeloxKVCache(keys, values)
    for s in range(0, 20, 7):  # chunks, then restored state: parts are found again
        cache.update_and_fetch(x[:, :, s:s + 7], x[:, :, s:s + 7])
    restored = VeloxKVCache(*ratequant.make_mixed_codecs(turboquant_mse, {}, spec, [2, 4, 2], [3, 3, 1]))
    restored.state = cache.state
    assert mx.array_equal(restored.update_and_fetch(x[:, :, :1], x[:, :, :1])[0][:, :, :20],
                          cache.update_and_fetch(x[:, :, :1], x[:, :, :1])[0][:, :, :20])


def test_head_tensors_slices_per_head_and_keeps_shared():
    t = {"a": mx.arange(6).reshape(3, 2), "shared": mx.zeros((1, 4))}
    out = ratequant.head_tensors(t, [0, 2], 3)
    assert out["a"].tolist() == [[0, 1], [4, 5]] and out["shared"].shape == (1, 4)


@pytest.mark.parametrize("method", ["turboquant_mse", "vecinfer"])
def test_convert_with_fractional_bits_allocates_per_head_and_loads(tiny_llama, tmp_path, method):
    out = tmp_path / method
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--kv", method,
                         "--kv-bits", "2.5", *CALIB]) == 0
    entry = json.loads((out / "config.json").read_text())["kv_quant"]["methods"][method]
    assert entry["alloc"] == "ratequant" and entry["achieved_bits"] == 2.5
    widths = [b for layer in entry["layers"] for kind in ("key_bits", "value_bits") for b in layer[kind]]
    assert len(widths) == 2 * 2 * 2 and sum(widths) == 2.5 * len(widths)
    model, tok = velox.load(str(out))
    cache = mlx_lm.models.cache.make_prompt_cache(model)
    mlx_lm.generate(model, tok, prompt="Hello there, how are", max_tokens=4, prompt_cache=cache)
    c, layer = cache[0], entry["layers"][0]
    n = c.offset
    norms = 2 if method == "turboquant_mse" else 0  # vecinfer keys carry no norm
    key_bytes = sum(64 * b // 8 + norms for b in layer["key_bits"])
    value_bytes = sum(64 * b // 8 + 2 for b in layer["value_bits"])
    assert sum(p[:, :, :n].nbytes for p in c.keys) == n * key_bytes
    assert sum(p[:, :, :n].nbytes for p in c.values) == n * value_bytes


def test_bits_flags_are_checked(tiny_llama, tmp_path, capsys):
    base = ["--hf-path", str(tiny_llama), "--mlx-path", str(tmp_path / "x"), *CALIB]
    assert convert_main(base + ["--kv-bits", "2.5", "--kv-alloc", "uniform"]) == 2
    assert "fractional" in capsys.readouterr().err
    assert convert_main(base + ["--kv-bits", "3", "--kv-key-bits", "2"]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert convert_main(base + ["--kv", "turboquant_mse", "--kv-bits", "3"]) == 0
    layer = json.loads((tmp_path / "x" / "config.json").read_text())["kv_quant"]["methods"]["turboquant_mse"]["layers"][0]
    assert layer["key_bits"] == 3 and layer["value_bits"] == 3
