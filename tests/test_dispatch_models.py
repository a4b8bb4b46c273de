"""The attention dispatcher across mlx_lm model modules (llama, qwen3, gemma3_text, mistral).

Each model is a tiny random instance of mlx_lm's own class for that model_type; its
plain KVCache layers get turboquant VeloxKVCaches (sliding-window layers keep mlx_lm's
RotatingKVCache). With the fast path on, attention runs from the codes through the
dispatcher; off, the cache decodes its history for mlx_lm's sdpa. Both must generate the
same greedy tokens.
"""

import importlib
import sys

import mlx.core as mx
import pytest
from mlx_lm.models import base
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.utils import _get_classes

from velox import kernels
from velox.methods import turboquant_mse
from velox.runtime import attention
from velox.runtime.cache import VeloxKVCache

COMMON = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5, vocab_size=256,
              rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=True)
CONFIGS = {
    "llama": {},
    "qwen3": {},
    # sliding layers (RotatingKVCache, window 16) interleaved with full ones (velox caches)
    "gemma3_text": dict(sliding_window=16, sliding_window_pattern=2, query_pre_attn_scalar=64),
    # HF's mistral config: mlx_lm maps model_type "mistral" to its llama module
    "mistral": dict(sliding_window=4096),
}
PROMPT = mx.array([[3, 17, 200, 41, 9, 77, 128, 5, 66, 250, 31, 12, 90, 144, 7, 61, 33, 2, 180, 99]])


def tiny_model(model_type: str):
    """mlx_lm's model for ``model_type`` with a tiny random float32 config."""
    config = dict(COMMON, model_type=model_type, **CONFIGS[model_type])
    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


def velox_caches(model, fast: bool, sink: int = 2, window: int = 4) -> list:
    """The model's own caches with every plain KVCache replaced by a 4-bit turboquant VeloxKVCache
    (by default 2 fp16 sink tokens and a 4-token fp16 window: every region of the cache in play)."""
    args = model.args
    caches = []
    for i, native in enumerate(make_prompt_cache(model)):
        if type(native) is not KVCache:
            caches.append(native)
            continue
        kc = turboquant_mse.make_codec(args.num_key_value_heads, args.head_dim, 4, 2 * i)
        vc = turboquant_mse.make_codec(args.num_key_value_heads, args.head_dim, 4, 2 * i + 1)
        caches.append(VeloxKVCache(kc, vc, method="turboquant_mse", sink=sink, window=window, fast=fast))
    return caches


def greedy(model, cache: list, steps: int) -> tuple[list[int], mx.array]:
    """Prefill PROMPT in two chunks (the second at an offset), then ``steps`` greedy tokens.
    Returns the tokens and the logits of the second prefill chunk."""
    model(PROMPT[:, :7], cache=cache)
    logits = model(PROMPT[:, 7:], cache=cache)
    first = logits
    tokens = []
    for _ in range(steps):
        tok = mx.argmax(logits[:, -1], axis=-1)
        tokens.append(tok.item())
        logits = model(tok[:, None], cache=cache)
    return tokens, first


@pytest.mark.parametrize("regions", [(2, 4), (0, 0)], ids=["sink-window", "codes-only"])
@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_model_generates_the_same_tokens_fast_or_not(model_type, regions, dispatcher, monkeypatch):
    """Codes only, on a GPU, each decode launch also encodes the step's token (CompressedKV.new);
    with fp16 regions the append kernel writes it first."""
    appends = []
    append = kernels.append
    monkeypatch.setattr(kernels, "append", lambda *a: appends.append(1) or append(*a))
    model = tiny_model(model_type)
    runs = {}
    for fast in (True, False):
        cache = velox_caches(model, fast, *regions)
        mine = [c for c in cache if isinstance(c, VeloxKVCache)]
        assert mine and all(c.fast == fast for c in mine)
        runs[fast] = greedy(model, cache, steps=12)
        assert all(c.coded > 0 and c.codes_only == fast for c in mine)
    # on a GPU: an append launch per decode step and velox layer with fp16 regions, none without
    assert (len(appends) > 0) == (kernels.backend() != "cpu" and regions != (0, 0))
    assert runs[True][0] == runs[False][0]
    a, b = runs[True][1], runs[False][1]
    # Not bit-equal: the first chunk's attention sums in another order on each path, and a
    # ~1e-6 change in a later layer's keys can flip a 4-bit rounding (seen on qwen3: 2e-3).
    assert mx.max(mx.abs(a - b)).item() <= 1e-2 * mx.max(mx.abs(b)).item()


def test_install_is_idempotent_and_removable():
    was = attention.is_installed()
    attention.uninstall()
    try:
        modules = [importlib.import_module(f"mlx_lm.models.{name}") for name in ("llama", "qwen3", "gemma3_text")]
        original = base.scaled_dot_product_attention
        assert all(m.scaled_dot_product_attention is original for m in modules)
        attention.install()
        attention.install()
        assert attention.is_installed()
        assert all(m.scaled_dot_product_attention is attention.dispatch_attention for m in modules + [base])
        # a model module imported after install picks the dispatcher up from base
        sys.modules.pop("mlx_lm.models.ministral3", None)
        late = importlib.import_module("mlx_lm.models.ministral3")
        assert late.scaled_dot_product_attention is attention.dispatch_attention
        attention.uninstall()
        attention.uninstall()
        assert not attention.is_installed()
        assert all(m.scaled_dot_product_attention is original for m in modules + [base, late])
    finally:
        if was:
            attention.install()


def test_other_caches_reach_mlx_lm_unchanged(dispatcher):
    """A plain KVCache under the dispatcher gives exactly mlx_lm's own output."""
    model = tiny_model("llama")
    outs = []
    for installed in (True, False):
        (attention.install if installed else attention.uninstall)()
        outs.append(model(PROMPT, cache=make_prompt_cache(model)))
    assert mx.array_equal(outs[0], outs[1])
