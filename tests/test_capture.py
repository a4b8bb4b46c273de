import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import base
from mlx_lm.models.rope_utils import initialize_rope

from velox.convert.capture import capture
from velox.methods.rope import RopeInverse, rope_matrices
from velox.runtime import attention

ROPES = {
    "default": dict(dims=64, base=10000.0, traditional=False, scaling_config=None),
    "traditional": dict(dims=64, base=10000.0, traditional=True, scaling_config=None),
    "partial": dict(dims=32, base=10000.0, traditional=False, scaling_config=None),
    "llama3": dict(dims=64, base=500000.0, traditional=False,
                   scaling_config={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "yarn": dict(dims=64, base=10000.0, traditional=False,
                 scaling_config={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}),
}


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_inverse_rope_round_trip(kind):
    cfg = ROPES[kind]
    rope = initialize_rope(cfg["dims"], cfg["base"], cfg["traditional"], cfg["scaling_config"], 131072)
    L, H, D = 40, 3, 64
    pre = mx.random.normal((1, H, L, D), key=mx.random.key(0))
    post = rope(pre)
    # reference: the probed per-position matrices, inverted densely
    mats = rope_matrices(rope, L, D)
    back = np.einsum("pij,hpj->hpi", np.linalg.inv(mats), np.array(post[0], dtype=np.float64))
    assert np.allclose(back, np.array(pre[0]), atol=1e-4)
    # the runtime inverse (pair sign flip through the module itself), at any offset
    inv = RopeInverse(rope, D)
    for offset in (0, 517, 7000):
        assert mx.allclose(inv.unrope(rope(pre, offset=offset), offset), pre, atol=1e-5)


def test_capture_records_every_layer_and_restores_attention(tiny_llama):
    import mlx_lm

    model, tok = mlx_lm.load(str(tiny_llama))
    seqs = np.random.default_rng(0).integers(0, 1000, (3, 32))
    attention.uninstall()  # an earlier velox.load installed it; capture leaves the state it finds
    acts = capture(model, seqs, progress=False)
    assert len(acts) == 2
    a = acts[1]
    assert a.keys.shape == (96, 2, 64) and a.values.shape == (96, 2, 64)
    assert a.queries.shape == (96, 4, 64)
    assert a.positions.tolist() == list(range(32)) * 3
    # pre-RoPE keys keep each key's norm (RoPE is a rotation) and differ from post-RoPE ones
    assert np.allclose(np.linalg.norm(a.keys_pre_rope.astype(np.float32), axis=-1),
                       np.linalg.norm(a.keys.astype(np.float32), axis=-1), rtol=5e-3)
    assert np.allclose(a.keys_pre_rope[0], a.keys[0], atol=1e-3)  # position 0 is not rotated
    assert not np.allclose(a.keys_pre_rope[5], a.keys[5], atol=1e-2)
    assert base.scaled_dot_product_attention is attention._ORIGINAL


def test_attention_install_is_idempotent_and_removable():
    import mlx_lm.models.llama as llama

    attention.install()
    attention.install()
    assert llama.scaled_dot_product_attention is attention.dispatch_attention
    attention.uninstall()
    assert llama.scaled_dot_product_attention is attention._ORIGINAL


def test_capture_leaves_the_dispatcher_as_it_found_it(tiny_llama):
    """capture() after velox.load keeps the dispatcher velox.load installed (the fast path
    needs it); without one before, capture leaves none behind."""
    import mlx_lm

    import velox
    from velox.convert.pipeline import convert

    model, _ = mlx_lm.load(str(tiny_llama))
    seqs = np.random.default_rng(0).integers(0, 1000, (1, 16))
    attention.uninstall()
    capture(model, seqs, progress=False)
    assert not attention.is_installed()
    folder = tiny_llama.parent / "kv-capture-state"
    convert(str(tiny_llama), str(folder), kv="turboquant_mse", calib_tokens=64, calib_seq_len=32, progress=False,
            force=True)
    velox.load(str(folder))
    assert attention.is_installed()
    capture(model, seqs, progress=False)
    assert attention.is_installed()
    attention.uninstall()


def test_queries_from_the_rope_module_match_the_dispatchers(tiny_llama, monkeypatch):
    """A layer whose attention does not reach the dispatcher gives its queries through its
    rope module: the same post-RoPE queries the dispatcher sees on a layer that does."""
    import mlx_lm

    from velox.convert import capture as capture_module
    from velox.runtime.layers import cache_layout

    model, _ = mlx_lm.load(str(tiny_llama))
    seqs = np.random.default_rng(1).integers(0, 1000, (2, 24))
    direct = capture(model, seqs, progress=False)

    def no_dispatch(m):
        layout = cache_layout(m)
        layout.attends_from_cache = [False] * len(layout.attends_from_cache)
        return layout

    monkeypatch.setattr(capture_module, "cache_layout", no_dispatch)
    via_rope = capture(model, seqs, progress=False)
    for a, b in zip(direct, via_rope):
        np.testing.assert_array_equal(a.queries, b.queries)
        np.testing.assert_array_equal(a.keys, b.keys)
    from velox.methods.rope import layer_rope
    assert type(layer_rope(model, 0)).__name__ != "RopeRecorder"  # the modules are put back
