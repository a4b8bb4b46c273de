"""velox-convert's ecosystem side: mlx_lm weight quantization (-q), an already-quantized input,
--dry-run, the summary table, --help and the model card, on a tiny random llama."""

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from huggingface_hub import ModelCard
from mlx_lm.convert import configure_parser as mlx_lm_convert_parser
from mlx_lm.convert import convert as mlx_lm_convert

import velox
from velox.convert.cli import Q_MODES, build_parser
from velox.convert.cli import main as convert_main
from velox.convert.pipeline import calibration_compute
from velox.runtime.cache import VeloxKVCache
from velox.runtime.evaluate import main as eval_main

from conftest import LLAMA_CONFIG, write_tiny_llama, write_tiny_model

CALIB = ["--calib-tokens", "256", "--calib-seq-len", "64", "--quiet"]


@pytest.fixture(scope="module")
def tiny_bf16(smollm2_path, tmp_path_factory) -> Path:
    """The tiny llama stored in bfloat16, as Hub checkpoints are: a float32 upcast of the
    saved weights or of the quantization scales would show."""
    folder = write_tiny_llama(tmp_path_factory.mktemp("bf16") / "tiny-bf16", smollm2_path)
    weights = mx.load(str(folder / "model.safetensors"))
    mx.save_safetensors(str(folder / "model.safetensors"), {k: v.astype(mx.bfloat16) for k, v in weights.items()})
    return folder


def run_convert(args: list[str]) -> tuple[int, str]:
    """velox-convert's exit code and stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = convert_main(args)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def quantized(tiny_bf16, tmp_path_factory) -> tuple[Path, str]:
    """(folder converted with -q 4-bit weights, its summary printout)."""
    out = tmp_path_factory.mktemp("q") / "tiny-q4"
    rc, printed = run_convert(["--hf-path", str(tiny_bf16), "--mlx-path", str(out), "-q", "--q-bits", "4",
                               "--q-group-size", "64", "--kv", "spectral,turboquant_mse", *CALIB])
    assert rc == 0
    return out, printed


def summary_bytes(printed: str) -> dict[str, float]:
    """method -> B/token/layer column of velox-convert's summary table."""
    rows = re.findall(r"^(\w+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+[\d.]+×", printed, re.M)
    return {m: float(b) for m, b in rows}


def test_quantized_folder_has_mlx_lm_quantization_and_packed_weights(quantized):
    out, _ = quantized
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert config["quantization_config"] == config["quantization"]  # as mlx_lm's save_config writes it
    weights = mx.load(str(out / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    # [256 out, 64 in] at 4 bits: 8 uint32 words per row, one scale and bias per group of 64
    assert weights[f"{q}.weight"].dtype == mx.uint32 and weights[f"{q}.weight"].shape == (256, 8)
    assert weights[f"{q}.scales"].shape == weights[f"{q}.biases"].shape == (256, 1)
    # saved before velox's float32 compute cast: scales and norms keep the checkpoint's bf16
    assert weights[f"{q}.scales"].dtype == mx.bfloat16
    assert weights["model.norm.weight"].dtype == mx.bfloat16


def test_quantized_folder_loads_with_velox_and_mlx_lm(quantized):
    out, _ = quantized
    model, tok = velox.load(str(out))
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    cache = model.make_cache()
    assert all(isinstance(c, VeloxKVCache) and c.method == "spectral" for c in cache)
    text = mlx_lm.generate(model, tok, prompt="Hello", max_tokens=4, prompt_cache=cache)
    assert isinstance(text, str) and cache[0].offset > 0
    plain, tok = mlx_lm.load(str(out))
    assert isinstance(plain.layers[1].mlp.down_proj, nn.QuantizedLinear)
    assert len(mlx_lm.generate(plain, tok, prompt="Hello", max_tokens=3)) > 0


def test_calibration_runs_on_the_quantized_model(quantized, tiny_bf16, tmp_path):
    out, _ = quantized
    full = tmp_path / "full"
    assert convert_main(["--hf-path", str(tiny_bf16), "--mlx-path", str(full), "--kv", "spectral", *CALIB]) == 0
    assert "quantization" not in json.loads((full / "config.json").read_text())
    a, b = mx.load(str(full / "kv_quant.safetensors")), mx.load(str(out / "kv_quant.safetensors"))
    basis = "spectral.layers.1.keys.basis"
    # 4-bit weights move the keys, so the eigenbasis fitted on them moves too
    assert mx.abs(mx.abs(a[basis]) - mx.abs(b[basis])).max().item() > 1e-2
    # on CPU the capture runs the quantized layers dequantized: the same function as the loaded model
    loaded, _ = velox.load(str(out))
    calib, _ = mlx_lm.load(str(out))
    calibration_compute(calib)
    assert not isinstance(calib.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    x = mx.array([[1, 2, 3, 4, 5, 6, 7, 8, 500, 9000]])
    want = loaded(x)  # no cache: exact attention, only the weights differ in kind
    assert mx.abs(calib(x) - want).max().item() < 1e-5 * mx.abs(want).max().item()


def test_summary_and_card_give_the_bytes_a_loaded_cache_holds(quantized):
    out, printed = quantized
    kvq = json.loads((out / "config.json").read_text())["kv_quant"]
    got = summary_bytes(printed)
    assert set(got) == {"spectral", "turboquant_mse"}
    # turboquant_mse 4/4 bits, 2 KV heads of 64: K and V each 64·4/8 bytes of codes + an fp16 norm
    assert got["turboquant_mse"] == kvq["methods"]["turboquant_mse"]["bytes_per_token_per_layer"] == 2 * 2 * (32 + 2)
    card = (out / "README.md").read_text()
    for method, b in got.items():
        assert kvq["methods"][method]["bytes_per_token_per_layer"] == b
        assert re.search(rf"\| `{method}` \| 4 \| 4 \| {b:.1f} \| {512 / b:.1f}× \|", card)
    # the same figure from velox.load's own caches after 1024 tokens of a real forward pass
    model, _ = velox.load(str(out), kv="spectral")
    cache = model.make_cache()
    model(mx.array(np.arange(1024)[None] % 4000), cache=cache)
    assert sum(c.nbytes for c in cache) / (len(cache) * 1024) == got["spectral"]
    assert "calib s" in printed and "4-bit affine, group size 64" in printed


def test_card_front_matter_usage_and_provenance(quantized):
    out, _ = quantized
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "mlx" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model == "tiny-bf16" and card.data.base_model_relation == "quantized"
    assert {"mlx", "velox", "kv-cache-quantization", "spectral", "turboquant_mse", "quantized", "4-bit"} \
        <= set(card.data.tags)
    assert "quantized by mlx_lm" in card.text and "calibrated on that quantized model" in card.text
    assert "Calibrated on 256 tokens of `calib_python_docs.txt`" in card.text
    for usage in ('velox.load("tiny-q4")', "velox-generate --model tiny-q4", "velox-serve --model tiny-q4",
                  "/v1/chat/completions"):
        assert usage in card.text
    assert f"with velox {velox.__version__} (kv_quant format v1); weights quantized by mlx_lm " \
           f"{mlx_lm.__version__}." in card.text


def test_eval_fills_the_quality_block_of_a_quantized_folder(quantized, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(quantized[0], out)
    assert "Quality not measured yet" in (out / "README.md").read_text()
    assert eval_main(["--model", str(out), "--tokens", "512", "--window", "256", "--baselines", "fp16",
                      "--kv", "spectral", "--passkey-lengths", "", "--update-card", "--quiet"]) == 0
    card = ModelCard.load(out / "README.md")
    assert "Measured quality (velox-eval)" in card.text and "Quality not measured yet" not in card.text
    assert "quantized" in card.data.tags
    kvq = json.loads((out / "config.json").read_text())["kv_quant"]
    assert kvq["quality"]["runs"]["spectral"]["ppl"] > 0
    # velox-eval's bytes per token (all layers, read after real text) agree with the card's per-layer figure
    per_layer = kvq["methods"]["spectral"]["bytes_per_token_per_layer"]
    assert kvq["quality"]["runs"]["spectral"]["bytes_per_token"] == 2 * per_layer


def test_already_quantized_input_keeps_its_weights(tiny_bf16, tmp_path, monkeypatch, capsys):
    mq = tmp_path / "tiny-8bit"
    mlx_lm_convert(str(tiny_bf16), str(mq), quantize=True, q_bits=8, q_group_size=32)  # what the Hub holds
    out = tmp_path / "kv"
    uploads = []
    monkeypatch.setattr("velox.hub.upload_or_report", lambda *a, **k: uploads.append(a) or 0)
    assert convert_main(["--hf-path", str(mq), "--mlx-path", str(out), "--kv", "turboquant_mse",
                         "--upload-repo", "me/tiny-kv", *CALIB]) == 0
    assert uploads == [(str(out), "me/tiny-kv")]
    src, got = mx.load(str(mq / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    assert set(src) == set(got)
    assert all(src[k].dtype == got[k].dtype and mx.array_equal(src[k], got[k]).item() for k in src)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == json.loads((mq / "config.json").read_text())["quantization"]
    card = ModelCard.load(out / "README.md")
    assert "8-bit" in card.data.tags and card.data.get("base_model_relation") is None
    assert "kept as the input quantized them: 8-bit affine, group size 32" in card.text
    assert 'velox.load("me/tiny-kv")' in card.text and "velox-serve --model me/tiny-kv" in card.text
    model, _ = velox.load(str(out))
    assert isinstance(model.make_cache()[0], VeloxKVCache)

    capsys.readouterr()
    again = tmp_path / "again"
    assert convert_main(["--hf-path", str(mq), "--mlx-path", str(again), "-q", *CALIB]) == 2
    err = capsys.readouterr().err
    assert f"{mq} is already quantized: 8-bit affine, group size 32" in err and "Drop -q" in err
    assert not again.exists()


def test_dry_run_prints_the_plan_and_writes_nothing(smollm2_path, tmp_path):
    config = {k: v for k, v in LLAMA_CONFIG.items() if k != "model_type"}
    # sliding-window layers (RotatingKVCache) every other layer: those stay native
    gemma = write_tiny_model(tmp_path / "src" / "gemma", smollm2_path, "gemma3_text", **dict(
        config, num_hidden_layers=4, sliding_window=16, sliding_window_pattern=2, query_pre_attn_scalar=64))
    out = tmp_path / "out" / "kv"
    rc, printed = run_convert(["--hf-path", str(gemma), "--mlx-path", str(out), "--kv", "spectral,rabitq",
                               "--kv-sink", "4", "--rabitq-nlist", "16", "-q", "--q-bits", "8",
                               "--dry-run", "--upload-repo", "me/x", *CALIB])
    assert rc == 0
    for line in (f"model        {gemma} (gemma3_text, 4 layers)",
                 "weights      quantized by mlx_lm",
                 "8-bit affine, group size 64",
                 "KV caches    2 plain KVCache layers coded by velox; native: 0 (RotatingKVCache), 2 (RotatingKVCache)",
                 "KV heads     2 per layer, head_dim 64",
                 "  spectral         K 4 bits, V 4 bits (sink 4)",
                 "  rabitq           K 1 bits, V 4 bits (sink 4, nlist 16)",
                 "calibration  256 tokens (4 sequences of 64) of calib_python_docs.txt, seed 0",
                 f"output       {out}",
                 "then         upload to me/x"):
        assert line in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # not even the output's parent
    # the dry run stops where the conversion would
    rc, _ = run_convert(["--hf-path", str(gemma), "--mlx-path", str(out), "--kv", "spectral",
                         "--kv-outliers", "4", "--dry-run", *CALIB])
    assert rc == 2


def test_q_mode_defaults_and_limits_are_mlx_lm_s(tiny_llama, tmp_path, capsys):
    out = tmp_path / "m"
    rc, printed = run_convert(["--hf-path", str(tiny_llama), "--mlx-path", str(out), "-q", "--q-mode", "mxfp4",
                               "--dry-run", *CALIB])
    assert rc == 0 and "4-bit mxfp4, group size 32" in printed
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(out), "-q", "--q-mode", "mxfp4",
                         "--q-group-size", "64", *CALIB]) == 2
    assert "mxfp4 quantization requires group size 32" in capsys.readouterr().err and not out.exists()


def test_every_flag_has_help_and_weight_flags_match_mlx_lm():
    ours = {a.dest: a for a in build_parser()._actions}
    assert all(a.help and a.help.strip() for a in ours.values())
    theirs = {a.dest: a for a in mlx_lm_convert_parser()._actions}
    for dest in ("quantize", "q_group_size", "q_bits", "q_mode"):
        assert ours[dest].option_strings == theirs[dest].option_strings
        assert ours[dest].default == theirs[dest].default
    assert list(Q_MODES) == list(theirs["q_mode"].choices)
