"""Tiny random-weight configs for every model type the installed mlx_lm can build.

``tiny_config(model_type)`` derives a config.json dict from the type's ``ModelArgs``
dataclass: every required field gets a small value (``BASE`` by name, else a name rule),
defaulted fields keep their default unless it is a big size (experts, vocab, ranks,
widths...), which is shrunk to the ``BASE`` value; then ``OVERRIDES[model_type]`` is
applied. Wrapper types whose ModelArgs has a ``text_config`` get a tiny text_config
derived the same way from the text model's args class.

Every tiny model has vocab_size 49152 (SmolLM2's tokenizer), at most 4 layers, hidden
size <= 128, <= 4 experts with <= 2 active; hybrid models keep both kinds of layers.

    python scripts/tiny_configs.py              # smoke-test every type
    python scripts/tiny_configs.py llama gemma3 # ... or just these
    TINY_TRACE=1 python scripts/tiny_configs.py x  # with tracebacks of failures
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import pathlib
import sys
import time
import traceback
import types
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx_lm.utils import _get_classes

VOCAB = 49152  # SmolLM2's tokenizer: the repo's tests feed ids < 49152

# Generic small values by field name. Required fields take these; defaulted fields take
# them only when the default is a bigger int (see _SHRINKABLE / _value).
BASE: dict[str, Any] = dict(
    # widths
    hidden_size=64, d_model=64, n_embd=64, hidden_dim=64, model_dim=64, dim=64, block_dim=64,
    intermediate_size=128, ffn_hidden_size=128, n_inner=128, ff_intermediate_size=128,
    intermediate_size_mlp=128, block_ff_dim=128, mlp_hidden_size=128,
    moe_intermediate_size=64, expert_ffn_hidden_size=64, shared_expert_intermediate_size=64,
    shared_intermediate_size=64, moe_shared_expert_intermediate_size=64, share_expert_dim=64,
    # depth
    num_hidden_layers=2, num_layers=2, n_layers=2, n_layer=2, num_transformer_layers=2,
    # heads
    num_attention_heads=4, n_head=4, n_heads=4, num_heads=4, num_query_heads=4,
    num_key_value_heads=2, n_kv_heads=2, num_kv_heads=2, num_attention_groups=2,
    head_dim=16, kv_channels=16, v_head_dim=16, qk_nope_head_dim=16, qk_rope_head_dim=16,
    global_head_dim=16, swa_head_dim=16, swa_v_head_dim=16, index_head_dim=16,
    hidden_size_per_head=16, mamba_head_dim=16, mamba_d_head=16,
    linear_key_head_dim=16, linear_value_head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=2, index_n_heads=2,
    index_topk=4, rotary_dim=16, attention_chunk_size=16,
    swa_num_attention_heads=4, swa_num_key_value_heads=2,
    # low-rank projections (MLA, rwkv7 ...)
    kv_lora_rank=32, q_lora_rank=32, o_lora_rank=32,
    a_low_rank_dim=16, v_low_rank_dim=16, gate_low_rank_dim=16, decay_low_rank_dim=16,
    # vocab / positions
    vocab_size=VOCAB, num_vocab=VOCAB, vocab_size_per_layer_input=VOCAB, embedding_size=VOCAB,
    max_position_embeddings=4096, n_positions=4096, n_ctx=4096, block_size=4096,
    model_max_length=4096,
    # experts: <= 4 experts, <= 2 active, 1 shared
    num_experts=4, n_routed_experts=4, num_local_experts=4, moe_num_experts=4,
    num_experts_per_tok=2, moe_topk=2, moe_k=2, moe_top_k=2, top_k_experts=2,
    num_experts_per_token=2,
    n_shared_experts=1, num_shared_experts=1, num_shared_expert=1, moe_num_shared_experts=1,
    n_group=1, topk_group=1, num_expert_group=1,
    first_k_dense_replace=1, num_dense_layers=1, decoder_sparse_step=1, moe_layer_freq=1,
    mlp_only_layers=[], routed_scaling_factor=1.0, norm_topk_prob=True,
    topk_method="noaux_tc", scoring_func="sigmoid",
    # hybrid patterns: both kinds of layer within the few layers
    sliding_window=16, sliding_window_size=16, attention_window_size=16, window_size=16,
    loop_window_size=16, sliding_window_pattern=2, full_attention_interval=2,
    layer_group_size=2, group_norm_size=1,
    # state-space / conv
    mamba_d_state=16, ssm_state_size=16, state_size=16, mamba_d_ssm=128,
    mamba_num_heads=8, mamba_n_heads=8, mamba_d_conv=4, mamba_expand=2,
    n_groups=1, mamba_n_groups=1, conv_kernel=4, conv1d_width=4, linear_conv_kernel_dim=4,
    conv_L_cache=3, time_step_rank=8, time_step_limit=(0.0, float("inf")),
    hidden_size_per_layer_input=16,
    # norms / rope / scalars (only used when required)
    rms_norm_eps=1e-5, layer_norm_eps=1e-5, layer_norm_epsilon=1e-5, norm_eps=1e-5,
    norm_epsilon=1e-5, layernorm_epsilon=1e-5,
    rope_theta=10000.0, rotary_emb_base=10000.0, swa_rope_theta=10000.0,
    partial_rotary_factor=1.0, rotary_pct=1.0, rope_scaling=None,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=True, hidden_act="silu",
    logits_scaling=1.0, attention_multiplier=0.25, embedding_multiplier=1.0,
    residual_multiplier=1.0, scale_depth=1.0, scale_emb=1.0, dim_model_base=64,
    use_qk_norm=False, qk_norm=False, post_norm=False,
)

# Defaulted fields shrunk to BASE when their default is a bigger int. Anything not listed
# keeps its default (rope, eps, flags, chunk sizes, ...).
_SHRINKABLE = {
    k for k, v in BASE.items()
    if isinstance(v, int) and not isinstance(v, bool) and k != "conv_L_cache"
}
# Defaulted-to-None fields filled from BASE: qwen3 reads rope_theta unconditionally; None
# experts mean "dense" (deepseek*, kimi*, granitemoehybrid...): fill them so MoE code runs.
_FILL_NONE = {"rope_theta", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
              "num_experts", "num_local_experts", "moe_intermediate_size"}
# Always exactly this value, whatever the default (the tokenizer's vocabulary).
_FORCED = {k: VOCAB for k in ("vocab_size", "num_vocab", "vocab_size_per_layer_input",
                              "embedding_size")}

SW, FA = "sliding_attention", "full_attention"  # HF's usual layer_types names
_ROPE = dict(rope_type="default", rope_theta=10000.0)

# model_type -> replacement / extra fields. "text_config" entries are merged into the
# derived tiny text_config.
OVERRIDES: dict[str, dict] = {
    # 2 regular blocks + 1 block that reuses the last block's KV (no cache of its own)
    "afm7": dict(num_layers=3, num_kv_reuse_layers=1),
    "afmoe": dict(layer_types=[SW, FA]),
    # sliding_window_layers: indices of sliding layers; the model asserts conv_window == 2
    "baichuan_m1": dict(sliding_window_layers=[0], conv_window=2),
    # every layer_group_size-th layer is attention, the rest linear attention
    "bailing_hybrid": dict(layer_group_size=2, group_norm_size=1),
    "bailing_moe_linear": dict(layer_group_size=2, group_norm_size=1),
    "bailing_moe_v3": dict(layer_group_size=2),
    "dbrx": dict(ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2),
                 attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0)),
    # layer 0: sliding window only; layer 1: + compressed KV (ratio 4) with its indexer
    "deepseek_v41": dict(compress_ratios=[0, 4], kv_source_layer_ids=[1],
                         index_source_layer_ids=[1]),
    # the attention reads rope_scaling["factor"] unconditionally (real configs are yarn)
    "deepseek_v2": dict(rope_scaling=dict(type="yarn", factor=1.0)),
    # L: local (sliding), G: global. transformers' Exaone4Config computes layer_types as
    # (i + 1) % sliding_window_pattern (an int) unless layer_types is given: give both,
    # as real EXAONE 4 configs do (mlx_lm reads only the string pattern)
    "exaone4": dict(sliding_window_pattern="LG", layer_types=[SW, FA]),
    "exaone_moe": dict(layer_types=[SW, FA], is_moe_layer=[False, True]),
    "gear": dict(num_hidden_layers=3, layer_types=["conv_mixer", SW, FA]),
    # last num_kv_shared_layers layers reuse the KV of earlier layers of their kind
    "gemma3n": dict(text_config=dict(
        num_hidden_layers=4, num_kv_shared_layers=2, layer_types=[SW, FA, SW, FA],
        activation_sparsity_pattern=[0.0] * 4, rope_local_base_freq=10000.0,
        final_logit_softcapping=30.0, altup_num_inputs=4, altup_coef_clip=120.0,
        altup_correct_scale=True, altup_active_idx=0, laurel_rank=8)),
    "gemma4_text": dict(num_hidden_layers=4, num_kv_shared_layers=2),
    "gemma4": dict(text_config=dict(num_hidden_layers=4, num_kv_shared_layers=2)),
    "granitemoehybrid": dict(
        layer_types=["mamba", "attention"], mamba_n_heads=8, mamba_d_head=16,
        mamba_proj_bias=False, mamba_d_state=16, mamba_d_conv=4, mamba_n_groups=1,
        mamba_conv_bias=True, shared_intermediate_size=64),
    # rope_scaling["alpha"] is read unconditionally (DynamicNTKAlphaRoPE); alpha 1: plain
    "hunyuan": dict(rope_scaling=dict(type="dynamic", factor=1.0, alpha=1.0)),
    "jamba": dict(attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=1,
                  expert_layer_period=2),
    # kda_layers are 1-based
    "kimi_linear": dict(linear_attn_config=dict(
        kda_layers=[1], full_attn_layers=[2], num_heads=4, head_dim=16,
        short_conv_kernel_size=4)),
    "kimi_k3": dict(text_config=dict(
        linear_attn_config=dict(kda_layers=[1], full_attn_layers=[2], num_heads=4,
                                head_dim=16, short_conv_kernel_size=4),
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
        num_experts=4, moe_intermediate_size=64)),
    # block_ff_dim / intermediate_size default to None and one is needed
    "lfm2": dict(layer_types=["conv", FA], block_ff_dim=128, block_multiple_of=16,
                 block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=False),
    "lfm2-vl": dict(text_config=dict(layer_types=["conv", FA], block_ff_dim=128,
                                     block_multiple_of=16,
                                     block_ffn_dim_multiplier=1.0,
                                     block_auto_adjust_ff_dim=False)),
    "lfm2_moe": dict(layer_types=["conv", FA]),
    # every 4th layer is a NoPE global layer, the others chunked-attention RoPE layers
    "llama4": dict(text_config=dict(num_hidden_layers=4, interleave_moe_layer_step=2,
                                    attention_chunk_size=16,
                                    num_experts_per_tok=1)),  # asserts top-1 routing
    "llama4_text": dict(no_rope_layers=[1, 0]),  # 1: RoPE layer, 0: NoPE layer
    "longcat_flash": dict(attention_method="MLA", zero_expert_type="identity",
                          zero_expert_num=1, mla_scale_q_lora=True, mla_scale_kv_lora=True),
    # n-gram embedding tables have ngram_vocab_size_ratio * vocab rows (78x: ~1 GB)
    "longcat_flash_ngram": dict(zero_expert_num=1, mla_scale_q_lora=True,
                                mla_scale_kv_lora=True, ngram_vocab_size_ratio=1),
    "laguna": dict(layer_types=[SW, FA]),  # default: all full attention
    # rope_parameters is keyed by layer type
    # transformers' Mamba2Config checks hidden_size * expand == num_heads * head_dim
    # (64 * 1 == 4 * 16); mlx_lm ignores expand (its inner width is num_heads * head_dim)
    "mamba2": dict(expand=1),
    "mellum": dict(layer_types=[SW, FA], rope_parameters={SW: _ROPE, FA: _ROPE}),
    "mimo_v2_flash": dict(hybrid_layer_pattern=[1, 0], moe_layer_freq=[0, 1],
                          add_swa_attention_sink_bias=True, add_full_attention_sink_bias=False),
    # layer 0 sparse attention (indexer keys picking 2 blocks of 4), layer 1 full.
    # mlx_lm treats any layer type but full_attention as sparse; "minimax_m3_sparse" is
    # transformers' name (its validator rejects others)
    "minimax_m3_vl": dict(text_config=dict(
        layer_types=["minimax_m3_sparse", FA], index_n_heads=2, index_head_dim=16,
        index_block_size=4, index_topk_blocks=2)),
    "muse_glimmer": dict(num_hidden_layers=4),  # default: 3 sliding + 1 full per 4 layers
    # builds on CPU but runs only on Metal (see UNBUILDABLE); layer_rope_theta 0: NoPE
    "muse_spark": dict(text_config=dict(
        layer_types=[SW, FA], layer_rope_theta=[10000.0, 0.0], rope_parameters=_ROPE,
        post_norm_eps=1e-8, final_logit_softcapping=30.0, output_multiplier=1.0,
        moe_hidden_size=64)),
    "minicpm3": dict(rope_scaling=dict(original_max_position_embeddings=4096)),
    "ministral3": dict(rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, llama_4_scaling_beta=0.1,
        original_max_position_embeddings=4096)),
    "mistral4": dict(rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, llama_4_scaling_beta=0.1,
        original_max_position_embeddings=4096)),
    # a normal block and one whose attention is a no-op (Nemotron-NAS prunes attention)
    "nemotron-nas": dict(block_configs=[
        dict(attention=dict(n_heads_in_group=2), ffn=dict(ffn_mult=2.0)),
        dict(attention=dict(no_op=True), ffn=dict(ffn_mult=2.0))]),
    # M: mamba2, -: MLP, *: attention
    "nemotron_h": dict(hybrid_override_pattern=["M", "-", "*", "-"]),
    "olmo3": dict(num_hidden_layers=4),  # default layer_types: every 4th layer full attention
    "olmo_hybrid": dict(num_hidden_layers=4, linear_allow_neg_eigval=True),
    "openelm": dict(num_query_heads=[4, 4], num_kv_heads=[2, 2], ffn_multipliers=[2.0, 2.0],
                    ffn_dim_divisor=16),
    # (UNBUILDABLE here) layer 0 dense attention, layer 1 block-sparse
    "phi3small": dict(dense_attention_every_n_layers=2, gegelu_limit=20.0),
    # a 2-bit Hadamard-rotated weight pack of qwen3_5: packed widths must be multiples
    # of 128 (hence hidden 128); one packed linear stands for the manifest
    "prism_hadamard_qwen35": dict(
        schema_version=1, tensor_namespace="mlx-lm-text",
        quantization=dict(bits=2, group_size=128, mode="affine"),
        modules=[dict(path="model.layers.0.mlp.up_proj", embedding=False, dtype="float16",
                      block=0)],
        text_config=dict(hidden_size=128)),
    "plamo": dict(n_shared_head=2),  # q heads / n_shared_head = kv heads
    # qwen3_5's text args default to num_experts=0 (dense); the MoE variant needs experts
    "qwen3_5_moe": dict(text_config=dict(num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=64,
                                         shared_expert_intermediate_size=64)),
    # sanitize reads language_model.lm_head unconditionally (no tied-embedding path):
    # untied, the MLX-format weights pass through it unchanged
    "qwen3_vl_moe": dict(text_config=dict(tie_word_embeddings=False)),
    # block_types defaults to None (checkpoints name it block_types or _block_types)
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], logits_soft_cap=30.0),
    "smollm3": dict(no_rope_layer_interval=2),  # every 2nd layer NoPE (default 4th)
    "spark2_5": dict(layer_types=[SW, FA], rope_parameters={SW: _ROPE, FA: _ROPE}),
}

# model_type -> why it cannot be built tiny here.
UNBUILDABLE: dict[str, str] = {}
if not mx.metal.is_available():
    UNBUILDABLE["bitnet"] = ("every projection is a BitLinear whose matmul is a "
                             "mx.fast.metal_kernel: no CPU path")
    UNBUILDABLE["muse_spark"] = ("qk-norm/rope, routing and norm kernels are "
                                 "mx.fast.metal_kernel (mlx_lm.kernels): no CPU path")

# forward() sets logits at token ids 100256..100351 (tiktoken dummies) to -inf
UNBUILDABLE["phi3small"] = ("forward writes -inf logits at ids 100256..100351: with vocab "
                            "49152 that scatter is out of bounds (segfault); never finite")
# olmo.py adds the mask to the scores (scores += mask) but gets the string "causal"
UNBUILDABLE["olmo"] = ("mlx_lm's olmo adds create_attention_mask's 'causal' string to the "
                       "scores: any prefill of > 1 token raises (bug in mlx_lm 0.32.2)")

# gear is unknown to transformers: mlx_lm.load's AutoTokenizer falls back to a generic
# PreTrainedConfig, whose validate_layer_type accepts only HF's layer type names; mlx_lm's
# gear builds its conv layers only from the name "conv_mixer" (no name both accept)
UNBUILDABLE["gear"] = ("transformers 5.x rejects mlx_lm's gear layer type 'conv_mixer' "
                       "(PreTrainedConfig.validate_layer_type, run by mlx_lm.load's "
                       "AutoTokenizer): a gear folder with a conv layer cannot be loaded")

# Modules that only probe for an optional package at import time (and sys.exit without it)
# but never use it: a stub module satisfies the probe.
_IMPORT_PROBES = {"olmo": "hf_olmo"}

# Wrappers whose text model args are another module's ModelArgs (others define a
# TextArgs / TextConfig / TextModelArgs class of their own).
TEXT_MODULE: dict[str, str] = {
    "gemma3": "gemma3_text", "gemma4": "gemma4_text", "kimi_k25": "deepseek_v3",
    "lfm2-vl": "lfm2", "mistral3": "llama", "pixtral": "llama", "qwen2_vl": "qwen2",
    "qwen3_vl": "qwen3", "qwen3_vl_moe": "qwen3_moe", "qwen3_5_moe": "qwen3_5",
    "prism_hadamard_qwen35": "qwen3_5",
}
_TEXT_CLASS_NAMES = ("TextArgs", "TextConfig", "TextModelArgs")


def model_types() -> list[str]:
    """Every module of mlx_lm.models that defines ModelArgs."""
    root = pathlib.Path(mlx_lm.models.__file__).parent
    return sorted(f.stem for f in root.glob("*.py") if "class ModelArgs" in f.read_text())


def _import(module: str) -> types.ModuleType:
    if module in _IMPORT_PROBES:
        sys.modules.setdefault(_IMPORT_PROBES[module], types.ModuleType(_IMPORT_PROBES[module]))
    return importlib.import_module(f"mlx_lm.models.{module}")


def _rule(name: str) -> Any:
    """A value for a required field not in BASE, by name pattern."""
    n = name.lower()
    if n.endswith("head_dim"):
        return 16
    if n.startswith("num_") and n.endswith("_heads"):
        return 2 if ("kv" in n or "key_value" in n) else 4
    if n.endswith(("_eps", "epsilon")):
        return 1e-5
    if n.endswith("bias") or n.startswith(("use_", "add_")):
        return False
    if n.endswith(("_layers", "_layer_ids")):
        return []
    if n.endswith("_rank"):
        return 32
    if n.endswith(("_size", "_dim")):
        return 64
    if n.endswith(("_multiplier", "_factor", "_scale")):
        return 1.0
    raise KeyError(f"no tiny value for required field {name!r}")


def _value(f: dataclasses.Field) -> tuple[bool, Any]:
    """(set?, value) for one ModelArgs field."""
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    if f.name in _FORCED:
        return True, _FORCED[f.name]
    if required:
        return True, BASE[f.name] if f.name in BASE else _rule(f.name)
    d = f.default
    if d is None and f.name in _FILL_NONE:
        return True, BASE[f.name]
    if (f.name in _SHRINKABLE and isinstance(d, int) and not isinstance(d, bool)
            and d > BASE[f.name]):
        return True, BASE[f.name]
    return False, None


def _derive(args_cls: type, model_type: str | None, given: dict) -> dict:
    """Tiny values for args_cls's fields (only those that need setting), then given."""
    out: dict = {}
    for f in dataclasses.fields(args_cls):
        if f.name in ("model_type", "text_config") or f.name in given:
            continue
        set_, v = _value(f)
        if set_:
            out[f.name] = list(v) if isinstance(v, (list, tuple)) else v
    if model_type is not None:
        out["model_type"] = model_type
    out.update(given)
    return out


def _text_args(model_type: str) -> tuple[type, str]:
    """(text args class, its model_type) of a wrapper type: a TextArgs / TextConfig /
    TextModelArgs dataclass of its own or of TEXT_MODULE's module, else that ModelArgs."""
    name = TEXT_MODULE.get(model_type, model_type)
    mod = _import(name)
    for cls_name in _TEXT_CLASS_NAMES:
        cls = getattr(mod, cls_name, None)
        if cls is not None and dataclasses.is_dataclass(cls):
            return cls, name if name != model_type else model_type + "_text"
    if name == model_type:
        raise KeyError(f"{model_type}: no text args class found")
    return mod.ModelArgs, name


def tiny_config(model_type: str) -> dict:
    """Full config.json dict (incl. model_type) for a tiny model of model_type."""
    args_cls = _import(model_type).ModelArgs
    over = copy.deepcopy(OVERRIDES.get(model_type, {}))
    text_over = over.pop("text_config", {})
    config = _derive(args_cls, None, over)
    config["model_type"] = model_type
    if "text_config" in {f.name for f in dataclasses.fields(args_cls)}:
        text_cls, text_type = _text_args(model_type)
        config["text_config"] = _derive(text_cls, text_type, text_over)
    return config


def build(model_type: str, seed: int = 0) -> tuple[nn.Module, dict]:
    """A random-weight tiny model of model_type (float32) and its config."""
    if model_type in UNBUILDABLE:
        raise RuntimeError(f"{model_type}: {UNBUILDABLE[model_type]}")
    config = tiny_config(model_type)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(mx.float32)  # compute in float32 whatever dtype a module initialises
    model.eval()
    mx.eval(model.parameters())
    return model, config


def _logits(out: Any) -> mx.array:
    """The logits of a forward pass (some models return a tuple / an output object)."""
    if isinstance(out, mx.array):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "logits"):
        return out.logits
    raise TypeError(f"forward returned {type(out).__name__}")


def _cache_name(c: Any) -> str:
    name = type(c).__name__
    inner = getattr(c, "caches", None)
    if isinstance(inner, (list, tuple)):
        name += "(" + "+".join(_cache_name(x) for x in inner) + ")"
    return name


def smoke(model_type: str) -> None:
    """Build, prefill 8 tokens, decode 2; assert [1, L, 49152] finite logits each time."""
    smoke_report(model_type)


def smoke_report(model_type: str) -> str:
    """smoke(), returning the cache classes per cache entry and anything unusual (a
    forward that returns no plain array, caches not one per model.layers entry)."""
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = build(model_type)
    cache = make_prompt_cache(model)
    notes = []
    for step, ids in enumerate(([[1, 2, 3, 4, 5, 6, 7, 8]], [[9]], [[9]])):
        out = model(mx.array(ids), cache=cache)
        if not isinstance(out, mx.array) and step == 0:
            notes.append(f"returns {type(out).__name__}")
        logits = _logits(out)
        mx.eval(logits)
        want = (1, len(ids[0]), VOCAB)
        if tuple(logits.shape) != want:
            raise AssertionError(f"step {step}: logits {tuple(logits.shape)} != {want}")
        if not mx.all(mx.isfinite(logits)).item():
            raise AssertionError(f"step {step}: non-finite logits")
    layers = getattr(model, "layers", None)
    if layers is None:
        notes.append("no model.layers")
    elif len(layers) != len(cache):
        notes.append(f"{len(cache)} caches for {len(layers)} model.layers")
    classes = ",".join(_cache_name(c) for c in cache)
    return classes + (f" [{'; '.join(notes)}]" if notes else "")


def main(argv: list[str]) -> int:
    todo = argv or model_types()
    ok = fail = 0
    for t in todo:
        t0 = time.perf_counter()
        try:
            note = smoke_report(t)
            ok += 1
            print(f"{t}: ok ({note}) [{time.perf_counter() - t0:.2f}s]", flush=True)
        except BaseException as e:  # olmo's import calls sys.exit; keep sweeping
            if isinstance(e, KeyboardInterrupt):
                raise
            fail += 1
            if os.environ.get("TINY_TRACE"):
                traceback.print_exc()
            msg = (str(e).splitlines() or [""])[0]
            print(f"{t}: FAIL {type(e).__name__}: {msg}", flush=True)
    print(f"ok {ok} / fail {fail}")
    return 1 if fail else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
