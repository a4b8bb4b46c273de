"""Hub upload (velox-upload, velox-convert --upload-repo) and download (velox.load of a repo id),
without network: HfApi is replaced by a recorder, and downloads resolve through a
pre-populated Hugging Face cache with HF_HUB_OFFLINE=1 (the real snapshot_download)."""

import shutil
from pathlib import Path

import mlx_lm
import pytest
from huggingface_hub import constants

import velox
from velox import hub
from velox.convert.cli import main as convert_main
from velox.runtime.cache import VeloxKVCache
from velox.runtime.loader import resolve_path

CALIB = ["--calib-tokens", "256", "--calib-seq-len", "64", "--quiet"]
FOLDER_FILES = {"config.json", "model.safetensors", "kv_quant.safetensors", "README.md", "tokenizer.json",
                "tokenizer_config.json"}


@pytest.fixture(scope="module")
def converted(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub") / "tiny-kv"
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--kv", "turboquant_mse", *CALIB]) == 0
    return out


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records calls and the files the folder holds then."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        files = {p.name for p in Path(folder_path).iterdir()}
        self.calls.append(("upload_folder", repo_id, dict(kwargs, folder_path=folder_path, files=files)))


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setattr(RecordingApi, "calls", [])
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    return RecordingApi.calls


def check_upload(calls, repo_id, folder):
    (c, rid, create), (u, uid, up) = calls
    assert (c, rid, u, uid) == ("create_repo", repo_id, "upload_folder", repo_id)
    assert create["exist_ok"] is True and create["repo_type"] == "model" and create["private"] is False
    assert up["repo_type"] == "model" and Path(up["folder_path"]) == Path(folder)
    assert FOLDER_FILES <= up["files"]


def test_velox_upload(converted, recorder, capsys):
    assert hub.main([str(converted), "user/tiny-kv"]) == 0
    check_upload(recorder, "user/tiny-kv", converted)
    assert "https://huggingface.co/user/tiny-kv" in capsys.readouterr().out


def test_convert_upload_repo(tiny_llama, tmp_path, recorder):
    out = tmp_path / "tiny-up"
    assert convert_main(["--hf-path", str(tiny_llama), "--mlx-path", str(out), "--kv", "turboquant_mse",
                         "--upload-repo", "user/tiny-up", *CALIB]) == 0
    check_upload(recorder, "user/tiny-up", out)


def test_upload_refuses_a_broken_folder(converted, tmp_path, recorder, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    data = bytearray((copy / "kv_quant.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "kv_quant.safetensors").write_bytes(bytes(data))
    assert hub.main([str(copy), "user/broken"]) == 1
    assert recorder == [] and "sha256 mismatch" in capsys.readouterr().err
    assert hub.main([str(tmp_path / "missing"), "user/broken"]) == 1 and recorder == []


def test_load_repo_id_from_hf_cache(converted, tmp_path, monkeypatch):
    """The layout snapshot_download leaves: models--user--name/{refs/main, snapshots/<sha>/...}."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--user--tiny-kv"
    shutil.copytree(converted, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    # huggingface_hub reads these into constants at import; it already is imported.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    assert resolve_path("user/tiny-kv").resolve() == (repo / "snapshots" / sha).resolve()
    model, tok = velox.load("user/tiny-kv")
    cache = mlx_lm.models.cache.make_prompt_cache(model)
    assert all(isinstance(c, VeloxKVCache) and c.method == "turboquant_mse" for c in cache)
    assert mlx_lm.generate(model, tok, prompt="Hi", max_tokens=2, prompt_cache=cache) is not None
    with pytest.raises(Exception, match="outgoing traffic has been disabled"):
        resolve_path("user/not-cached")
