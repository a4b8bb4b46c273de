"""velox-convert → folder → velox.load on a tiny random llama (fast)."""

import json
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from huggingface_hub import ModelCard

import velox
from velox.convert.cli import main as convert_main
from velox.format import VeloxFormatError, sha256_file
from velox.runtime.cache import VeloxKVCache
from velox.runtime.generate import main as generate_main

CALIB = ["--calib-tokens", "256", "--calib-seq-len", "64", "--quiet"]


@pytest.fixture(scope="module")
def converted(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "tiny-kv"
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(out),
                         "--kv", "spectral,turboquant_mse", "--kv-value-bits", "3", *CALIB]) == 0
    return out


def test_folder_contents_and_kv_quant(converted, tiny_llama):
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "kv_quant.safetensors", "README.md",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert (converted / "tokenizer.json").read_bytes() == (tiny_llama / "tokenizer.json").read_bytes()
    kvq = json.loads((converted / "config.json").read_text())["kv_quant"]
    assert kvq["format_version"] == 1 and kvq["default_method"] == "spectral"
    assert list(kvq["methods"]) == ["spectral", "turboquant_mse"]
    assert kvq["methods"]["spectral"]["layers"][1] == {"layer": 1, "key_bits": 4, "value_bits": 3}
    assert kvq["calibration"]["tokens"] == 256 and kvq["calibration"]["corpus"] == "calib_python_docs.txt"
    assert kvq["artifacts"][0]["sha256"] == sha256_file(converted / "kv_quant.safetensors")
    tensors = mx.load(str(converted / "kv_quant.safetensors"))
    assert tensors["spectral.layers.0.keys.basis"].shape == (2, 64, 64)
    assert not any(".values." in k for k in tensors)  # values are coded data-free
    assert not any(k.startswith("turboquant_mse") for k in tensors)  # data-free
    card = ModelCard.load(converted / "README.md")
    assert card.data.library_name == "mlx"
    assert {"velox", "spectral", "turboquant_mse"} <= set(card.data.tags)
    assert not list(converted.parent.glob(".tiny-kv.tmp-*"))


def test_plain_mlx_lm_still_loads(converted):
    model, tok = mlx_lm.load(str(converted))
    assert len(mlx_lm.generate(model, tok, prompt="Hi", max_tokens=3)) > 0


@pytest.mark.parametrize("method", ["spectral", "turboquant_mse"])
def test_velox_load_installs_compressed_caches(converted, method):
    model, tok = velox.load(str(converted), kv=method)
    cache = mlx_lm.models.cache.make_prompt_cache(model)
    assert all(isinstance(c, VeloxKVCache) and c.method == method for c in cache)
    text = mlx_lm.generate(model, tok, prompt="Hello there", max_tokens=5, prompt_cache=cache)
    assert isinstance(text, str) and cache[0].offset > 0
    held = sum(c.nbytes for c in cache)
    # mlx_lm's KVCache holds 256-token steps too: 2 layers × K,V × 2 heads × 256 × 64 × fp16
    assert held * 3 < 2 * 2 * 2 * 256 * 64 * 2


def test_unknown_or_uncalibrated_method(converted):
    with pytest.raises(ValueError, match="was not calibrated"):
        velox.load(str(converted), kv="rabitq")


def test_tampered_artifact_is_refused(converted, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    data = bytearray((copy / "kv_quant.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "kv_quant.safetensors").write_bytes(bytes(data))
    with pytest.raises(VeloxFormatError, match="sha256 mismatch"):
        velox.load(str(copy))


def test_existing_target_refused_and_force_replaces(converted, tiny_llama, capsys):
    args = ["--hf-path", str(tiny_llama), "--mlx-path", str(converted), "--kv", "turboquant_mse", *CALIB]
    assert convert_main(args) == 2
    assert "already exists" in capsys.readouterr().err
    before = json.loads((converted / "config.json").read_text())["kv_quant"]["default_method"]
    assert before == "spectral"


def test_force_swaps_atomically(tiny_llama, tmp_path):
    out = tmp_path / "m"
    base = ["--hf-path", str(tiny_llama), "--mlx-path", str(out), *CALIB]
    assert convert_main([*base, "--kv", "turboquant_mse"]) == 0
    assert convert_main([*base, "--kv", "spectral", "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["kv_quant"]["default_method"] == "spectral"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_failures_leave_nothing_behind(tiny_llama, tmp_path, capsys):
    out = tmp_path / "bad"
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(out),
                         "--calib-data", str(short), "--quiet"]) == 2
    assert "at least 8192 are needed" in capsys.readouterr().err
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--kv", "nope"]) == 2
    assert "unknown KV method 'nope'" in capsys.readouterr().err
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--kv", "spectral",
                         "--kv-key-bits", "9"]) == 2
    assert list(tmp_path.iterdir()) == [short]


def test_jsonl_calibration_data(tiny_llama, tmp_path):
    from velox.convert.calib_data import DEFAULT_CORPUS

    paragraphs = [p for p in DEFAULT_CORPUS.read_text().split("\n\n") if p.strip()]
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": p}) for p in paragraphs[:200]))
    out = tmp_path / "j"
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--kv", "turboquant_mse",
                         "--calib-data", str(data), *CALIB]) == 0
    assert json.loads((out / "config.json").read_text())["kv_quant"]["calibration"]["corpus"] == "calib.jsonl"


def test_generate_cli_reports_kv_bytes(converted, capsys):
    assert generate_main(["--model", str(converted), "--prompt", "Hi", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "KV cache:" in out and "smaller" in out


def test_kv_sink_keeps_first_tokens_in_fp16_and_counts_them(tiny_llama, tmp_path, capsys):
    out = tmp_path / "sink"
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--kv", "turboquant_mse",
                         "--kv-sink", "4", *CALIB]) == 0
    assert json.loads((out / "config.json").read_text())["kv_quant"]["methods"]["turboquant_mse"]["sink"] == 4
    model, _ = velox.load(str(out))
    cache = model.make_cache()
    model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8]]), cache=cache)
    c = cache[0]
    assert c.sink == 4 and c.offset == 8
    k, _ = c.fetch(mx.float32)
    assert k.shape[2] == 8
    # the sink tokens are held exactly (fp16) next to the codes of the other 4
    assert c.sink_kv[0].dtype == mx.float16 and c.sink_kv[0].shape[2] == 4
    assert c.nbytes == sum(b.nbytes for b in c.keys + c.values) + sum(x.nbytes for x in c.sink_kv)
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(tmp_path / "bad"), "--kv", "turboquant_mse",
                         "--kv-sink", "-1", *CALIB]) == 2
    assert "--kv-sink must be in 0..4096" in capsys.readouterr().err


def test_kv_outliers_and_window_are_recorded_and_installed(tiny_llama, tmp_path, capsys):
    out = tmp_path / "outl"
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--kv", "turboquant_prod",
                         "--kv-bits", "3", "--kv-outliers", "4", "--kv-window", "3", *CALIB]) == 0
    entry = json.loads((out / "config.json").read_text())["kv_quant"]["methods"]["turboquant_prod"]
    assert entry["options"] == {"outliers": 4} and entry["window"] == 3
    assert mx.load(str(out / "kv_quant.safetensors"))["turboquant_prod.layers.0.keys.outlier_channels"].shape == (2, 4)
    model, tok = velox.load(str(out))
    cache = mlx_lm.models.cache.make_prompt_cache(model)
    model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]), cache=cache)
    c = cache[0]
    assert c.window == 3 and c.coded == 7 and c.recent_kv[0].shape[2] == 3
    # per key: 4 int8 outliers; 60 channels: 2-bit MSE codes (4 uint32 words) + fp16 norm,
    # 1-bit QJL signs of the residual (2 words) + fp16 norm
    assert sum(p[:, :, :7].nbytes for p in c.keys) == 7 * 2 * (4 + 16 + 2 + 8 + 2)
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(tmp_path / "bad"), "--kv", "spectral",
                         "--kv-outliers", "4", *CALIB]) == 2
    assert "--kv-outliers works with" in capsys.readouterr().err and not (tmp_path / "bad").exists()
