"""Conversion never leaves a half-written folder, explains bad input, and is deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from velox.convert import pipeline
from velox.convert.cli import main as convert_main
from velox.format import ARTIFACT_FILE, sha256_file
from velox.methods import spectral
from velox.runtime.layers import UnsupportedArchitecture

from conftest import write_tiny_llama, write_tiny_model

CALIB = dict(calib_tokens=256, calib_seq_len=64, progress=False)


class Boom(Exception):
    """A failure injected into one stage of the pipeline."""


def fail(exc: BaseException):
    def raiser(*args, **kwargs):
        raise exc
    return raiser


STAGES = {  # (object, attribute) patched to raise, in pipeline order
    "save_model": (pipeline, "save_model"),
    "calibration data": (pipeline, "load_calibration"),
    "capture": (pipeline, "capture"),
    "calibrate": (spectral, "calibrate"),
    "write artifact": (pipeline.mx, "save_safetensors"),
    "model card": (pipeline, "render_card"),
}


def leftovers(parent: Path, name: str) -> list[str]:
    """What a conversion to parent/name left beside it: the target or its temp/old folders."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


@pytest.mark.parametrize("exc", [Boom("injected"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_failure_at_any_stage_leaves_nothing(tiny_llama, tmp_path, monkeypatch, stage, exc):
    obj, attr = STAGES[stage]
    monkeypatch.setattr(obj, attr, fail(exc))
    with pytest.raises(type(exc)):
        pipeline.convert(str(tiny_llama), str(tmp_path / "out"), kv="spectral", **CALIB)
    assert leftovers(tmp_path, "out") == []


def test_failed_force_keeps_the_old_folder(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "out"
    pipeline.convert(str(tiny_llama), str(out), kv="turboquant_mse", **CALIB)
    before = sha256_file(out / "config.json")
    monkeypatch.setattr(spectral, "calibrate", fail(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        pipeline.convert(str(tiny_llama), str(out), kv="spectral", force=True, **CALIB)
    assert leftovers(tmp_path, "out") == ["out"] and sha256_file(out / "config.json") == before


def test_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    target, tmp = tmp_path / "out", tmp_path / ".out.tmp-x"
    target.mkdir(), tmp.mkdir()
    (target / "old").write_text("old")
    real = pipeline.os.replace
    calls = []

    def replace(a, b):  # the second rename (new folder into place) fails
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError("disk gone")
        real(a, b)

    monkeypatch.setattr(pipeline.os, "replace", replace)
    with pytest.raises(OSError):
        pipeline.swap_into_place(tmp, target)
    assert (target / "old").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-x", "out"]  # convert's finally drops tmp


def test_too_little_calibration_data_states_the_minimum(tiny_llama, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("only a few words of text here")
    with pytest.raises(ValueError, match=r"has \d+ tokens; at least 128 are needed"):
        pipeline.convert(str(tiny_llama), str(tmp_path / "out"), calib_data=str(short),
                         calib_tokens=128, calib_seq_len=64, progress=False)
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(tmp_path / "out"), "--calib-tokens", "32",
                         "--calib-seq-len", "64", "--quiet"]) == 2
    assert "--calib-tokens (32) must be at least --calib-seq-len (64)" in capsys.readouterr().err
    assert leftovers(tmp_path, "out") == []


def test_nonfinite_activations_name_the_layer(smollm2_path, tmp_path, capsys):
    src = write_tiny_llama(tmp_path / "nan-llama", smollm2_path)
    weights = dict(mx.load(str(src / "model.safetensors")))
    w = np.array(weights["model.layers.1.self_attn.k_proj.weight"])
    w[0, 0] = np.inf  # layer 1's keys overflow; layer 0 stays finite
    weights["model.layers.1.self_attn.k_proj.weight"] = mx.array(w)
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    args = ["--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), "--kv", "turboquant_mse",
            "--calib-tokens", "128", "--calib-seq-len", "64", "--quiet"]
    assert convert_main(args) == 2
    err = capsys.readouterr().err
    assert "layer 1: NaN/Inf in captured keys" in err and "calibration sequence 0" in err
    assert leftovers(tmp_path, "out") == []


def test_same_model_data_and_seed_give_identical_artifacts(tiny_llama, tmp_path):
    digests = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        kvq = pipeline.convert(str(tiny_llama), str(out), kv="spectral,vecinfer", seed=3, **CALIB)
        digests.append(sha256_file(out / ARTIFACT_FILE))
        assert kvq["artifacts"][0]["sha256"] == digests[-1]
    assert digests[0] == digests[1]
    other = pipeline.convert(str(tiny_llama), str(tmp_path / "seed4"), kv="spectral,vecinfer", seed=4, **CALIB)
    assert other["artifacts"][0]["sha256"] != digests[0]  # the seed is really used
    cfg = [json.loads((tmp_path / f"run{r}" / "config.json").read_text())["kv_quant"] for r in range(2)]
    assert cfg[0]["calibration"]["sha256"] == cfg[1]["calibration"]["sha256"]


def test_unsupported_architecture_lists_the_supported_ones(tiny_llama, tmp_path, capsys):
    src = tmp_path / "odd"
    src.mkdir()
    for f in tiny_llama.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, model_type="not_a_model")))
    assert convert_main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Model type not_a_model not supported" in err
    assert "this mlx_lm supports: " in err and " llama, " in err and " qwen3_next, " in err
    assert "docs/ARCHITECTURES.md lists the" in err
    assert leftovers(tmp_path, "out") == []


def test_model_without_kv_cache_layers_is_refused_by_name(smollm2_path, tmp_path):
    src = write_tiny_model(tmp_path / "mamba", smollm2_path, "mamba", vocab_size=49152, hidden_size=64,
                           intermediate_size=128, state_size=8, num_hidden_layers=2, conv_kernel=4, use_bias=False,
                           use_conv_bias=True, time_step_rank=4, tie_word_embeddings=True)
    with pytest.raises(UnsupportedArchitecture,
                       match=r"model type 'mamba': it has no attention layer with a plain KVCache .*use ArraysCache"):
        pipeline.convert(str(src), str(tmp_path / "out"), kv="turboquant_mse", calib_tokens=128,
                         calib_seq_len=64, progress=False)
    assert leftovers(tmp_path, "out") == []
