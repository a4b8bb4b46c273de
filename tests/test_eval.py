"""velox-eval: the measurement math on known cases, and the CLI's outputs."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from huggingface_hub import ModelCard

import velox
from velox import kernels
from velox.kernels import cpu
from velox.convert.calib_data import EVAL_CORPUS
from velox.convert.capture import capture
from velox.convert.cli import main as convert_main
from velox.eval import attention_fidelity, bootstrap_delta, mlx_baseline_cache, teacher_forced_nll
from velox.format import VeloxFormatError
from velox.runtime.cache import ExactCodec, VeloxKVCache
from velox.runtime.evaluate import main as eval_main


Identity = ExactCodec


class DropHalf(Identity):
    """A deliberately broken codec: loses half of every vector."""

    def decode(self, x, offset=0):
        return mx.concatenate([x[..., :32], mx.zeros_like(x[..., 32:])], axis=-1)


@pytest.fixture(scope="module")
def model_and_tokens(tiny_llama):
    model, tok = mlx_lm.load(str(tiny_llama))
    model.set_dtype(mx.float32)
    return model, np.array(tok.encode(EVAL_CORPUS.read_text()))[:1024]


def caches(model, codec):
    return lambda: [VeloxKVCache(codec, codec) for _ in model.layers]


def test_perfect_cache_has_zero_delta_and_identical_nll(model_and_tokens):
    model, ids = model_and_tokens
    ref = teacher_forced_nll(model, ids, mlx_baseline_cache(model, "fp16"), window=256)
    same = teacher_forced_nll(model, ids, caches(model, Identity()), window=256)
    assert same.tokens == ref.tokens == 4 * (256 - 33)
    assert np.array_equal(same.nll, ref.nll)
    assert same.ppl / ref.ppl - 1 == 0.0
    assert bootstrap_delta(same.nll, ref.nll) == (0.0, 0.0)


def test_broken_cache_is_detected_by_attention_fidelity(model_and_tokens):
    # (its perplexity on the real model is checked in test_smollm2.py; a random model's is noise)
    model, ids = model_and_tokens
    acts = capture(model, ids[None, :256], progress=False)
    good = attention_fidelity(acts, caches(model, Identity()), length=256)
    broken = attention_fidelity(acts, caches(model, DropHalf()), length=256)
    assert all(r["output_rel_error"] < 1e-6 and r["score_cosine"] > 0.9999 for r in good)
    assert all(r["output_rel_error"] > 0.05 for r in broken)


def test_bootstrap_interval_covers_known_shift():
    rng = np.random.default_rng(0)
    ref = rng.normal(3.0, 0.3, size=(20, 100))
    worse = ref + 0.05  # every window 0.05 nats worse: ΔPPL = e^0.05 − 1 exactly
    lo, hi = bootstrap_delta(worse, ref)
    assert lo == pytest.approx(np.exp(0.05) - 1) and hi == pytest.approx(np.exp(0.05) - 1)
    noisy = ref + rng.normal(0, 0.2, size=(20, 1))
    lo, hi = bootstrap_delta(noisy, ref)
    assert lo < hi


def test_cli_writes_json_plot_and_card(tiny_llama, tmp_path):
    out = tmp_path / "tiny-kv"
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--kv", "spectral,turboquant_mse",
                         "--calib-tokens", "256", "--calib-seq-len", "64", "--quiet"]) == 0
    res_json, png = tmp_path / "r.json", tmp_path / "r.png"
    assert eval_main(["--model", str(out), "--tokens", "768", "--window", "256", "--baselines", "fp16,mlx4",
                      "--passkey-lengths", "256", "--json", str(res_json), "--plot", str(png),
                      "--update-card", "--quiet"]) == 0
    results = json.loads(res_json.read_text())
    assert set(results["runs"]) == {"fp16", "mlx4", "spectral", "turboquant_mse"}
    assert results["runs"]["fp16"]["delta_ppl"] == 0.0
    assert results["runs"]["spectral"]["bytes_per_token"] < results["runs"]["mlx4"]["bytes_per_token"]
    assert len(results["runs"]["spectral"]["attention"]) == 2
    # what a decode step reads: the C kernel on MLX's CPU backend (the full eigenbasis too, a D×D
    # matrix per key tile), mx ops elsewhere or without a compiler
    expected = {"fp16": "mlx_lm", "mlx4": "mlx_lm", "spectral": "kernel", "turboquant_mse": "kernel"}
    if kernels.backend() != "cpu" or cpu.library() is None:
        expected["spectral"] = "mx reference"
    if kernels.backend() == "cpu" and cpu.library() is None:
        expected["turboquant_mse"] = "mx reference"
    assert {k: r["decode_attention"] for k, r in results["runs"].items()} == expected
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    card = ModelCard.load(out / "README.md")
    assert "Measured quality (velox-eval)" in card.text and "turboquant_mse" in card.text
    kvq = json.loads((out / "config.json").read_text())["kv_quant"]
    assert kvq["quality"]["runs"]["spectral"]["bytes_per_token"] > 0
    velox.load(str(out))  # the quality block passes validation
    # running again replaces the block instead of appending a second one; fewer tokens than the
    # 512 attention fidelity reads measure on what there is
    assert eval_main(["--model", str(out), "--tokens", "384", "--window", "256", "--baselines", "fp16",
                      "--passkey-lengths", "", "--update-card", "--quiet"]) == 0
    assert (out / "README.md").read_text().count("Measured quality (velox-eval)") == 1
    assert json.loads((out / "config.json").read_text())["kv_quant"]["quality"]["tokens"] == 384
    assert eval_main(["--model", str(out), "--tokens", "256", "--window", "512", "--quiet"]) == 2
    config = json.loads((out / "config.json").read_text())
    config["kv_quant"]["quality"]["runs"]["spectral"]["ppl"] = "great"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(VeloxFormatError, match="quality.runs.spectral"):
        velox.load(str(out))


def test_convert_with_eval_updates_the_card(tiny_llama, tmp_path):
    out = tmp_path / "e"
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--kv", "turboquant_mse",
                         "--calib-tokens", "256", "--calib-seq-len", "64", "--eval", "--quiet"]) == 0
    kvq = json.loads((out / "config.json").read_text())["kv_quant"]
    assert set(kvq["quality"]["runs"]) == {"fp16", "mlx4", "turboquant_mse"}
    assert kvq["quality"]["tokens"] == 2048
    assert "Measured quality (velox-eval)" in (out / "README.md").read_text()
