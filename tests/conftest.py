"""Shared fixtures: the real SmolLM2 folder (built once, cached) and a tiny random llama."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Tests compare cache paths in float32. MLX's CUDA backend runs float32 matmuls as TF32 by
# default (~3e-4 relative error), enough to flip many 4-bit roundings between two paths.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402

from velox.runtime import attention  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = ROOT / ".cache" / "smollm2-135m-instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Hugging Face folder (scripts/fetch_test_model.py)."""
    if not (SMOLLM2 / "model.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_test_model.py"), "--out", str(SMOLLM2)],
                       check=True)
    return SMOLLM2


LLAMA_CONFIG = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5,
                    vocab_size=49152, rope_theta=10000.0, tie_word_embeddings=True,
                    max_position_embeddings=2048)


def write_tiny_model(folder: Path, tokenizer_src: Path, model_type: str, **config) -> Path:
    """A tiny random mlx_lm model of ``model_type`` with SmolLM2's tokenizer, saved as an HF folder.

    config: the model's config.json fields besides model_type (vocab_size 49152 to match
    the tokenizer). The class comes from mlx_lm's own model_type lookup, so any
    architecture mlx_lm loads can be written; weights are its random initialisation
    (seed 0), saved as mlx_lm would load them.
    """
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    config = dict(model_type=model_type, **config)
    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    model = model_class(args_class.from_dict(config))
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_src / name, folder / name)
    return folder


def write_tiny_llama(folder: Path, tokenizer_src: Path, **overrides) -> Path:
    """A tiny random llama with SmolLM2's tokenizer, saved as an HF folder."""
    return write_tiny_model(folder, tokenizer_src, **{**LLAMA_CONFIG, **overrides})


@pytest.fixture(scope="session")
def tiny_llama(smollm2_path, tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", smollm2_path)


def load_script(name: str):
    """scripts/<name>.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def dispatcher():
    """The attention dispatcher installed for the test, then put back as it was."""
    was = attention.is_installed()
    attention.install()
    yield
    if not was:
        attention.uninstall()
