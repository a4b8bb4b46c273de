import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from velox.methods import turboquant_mse
from velox.runtime.cache import ExactCodec, VeloxKVCache


Identity = ExactCodec


def make(bits=4, sink=0):
    return VeloxKVCache(turboquant_mse.make_codec(3, 64, bits, 0), turboquant_mse.make_codec(3, 64, bits, 1),
                        method="turboquant_mse", sink=sink)


def kv(n, seed=0):
    k = mx.random.normal((1, 3, n, 64), key=mx.random.key(seed))
    v = mx.random.normal((1, 3, n, 64), key=mx.random.key(seed + 100))
    return k, v


def test_update_and_fetch_grows_and_decodes_everything():
    cache = make()
    assert cache.empty() and cache.nbytes == 0
    k, v = kv(20)
    ks, vs = cache.update_and_fetch(k, v)
    assert ks.shape == (1, 3, 20, 64) and cache.offset == 20
    k1, v1 = kv(1, seed=7)
    ks2, _ = cache.update_and_fetch(k1, v1)
    assert ks2.shape == (1, 3, 21, 64)
    assert mx.array_equal(ks2[:, :, :20], ks)  # history is not re-encoded
    assert not hasattr(cache, "bits")  # mlx_lm would route to its affine attention


def test_bytes_match_claimed_bits_plus_norms():
    cache = make(bits=4)
    k, v = kv(256)
    cache.update_and_fetch(k, v)
    # per vector: 64 elements × 4 bits = 8 uint32 words + one fp16 norm = 34 bytes
    assert cache.nbytes == 2 * 3 * 256 * 34
    fp16 = KVCache()
    fp16.update_and_fetch(k.astype(mx.float16), v.astype(mx.float16))
    assert fp16.nbytes / cache.nbytes == pytest.approx(128 / 34)
    assert cache.fp16_nbytes == fp16.nbytes


def test_sink_tokens_are_exact_fp16_and_counted():
    cache = make(sink=4)
    k, v = kv(10)
    ks, vs = cache.update_and_fetch(k[:, :, :3], v[:, :, :3])  # sink not yet full
    ks, vs = cache.update_and_fetch(k[:, :, 3:], v[:, :, 3:])
    assert mx.array_equal(ks[:, :, :4], k[:, :, :4].astype(mx.float16).astype(mx.float32))
    assert not mx.allclose(ks[:, :, 4:], k[:, :, 4:], atol=1e-3)
    assert cache.nbytes == 2 * 3 * 4 * 64 * 2 + 2 * 3 * 256 * 34


def test_identity_codec_cache_equals_kvcache_in_a_model():
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=100)
    mx.random.seed(0)
    model = llama.Model(args)
    tokens = mx.array(np.random.default_rng(0).integers(0, 100, (1, 40)))
    outs = []
    for caches in ([KVCache(), KVCache()], [VeloxKVCache(Identity(), Identity()) for _ in range(2)]):
        a = model(tokens[:, :24], cache=caches)
        b = model(tokens[:, 24:], cache=caches)
        outs.append(mx.concatenate([a, b], axis=1))
    assert mx.allclose(outs[0], outs[1], atol=1e-5)


def test_trim_state_round_trip_and_mask():
    cache = make(sink=2)
    k, v = kv(12)
    full_k, full_v = cache.update_and_fetch(k, v)
    state = cache.state
    restored = VeloxKVCache(cache.key_codec, cache.value_codec, sink=2)
    restored.state = state
    k1, v1 = kv(1, seed=3)
    a = cache.update_and_fetch(k1, v1)[0]
    b = restored.update_and_fetch(k1, v1)[0]
    assert mx.array_equal(a, b)
    assert cache.is_trimmable() and cache.trim(5) == 5 and cache.offset == 8
    again = cache.update_and_fetch(k[:, :, 8:12], v[:, :, 8:12])[0]
    assert mx.array_equal(again, full_k)  # trimmed then re-extended = same history
    assert cache.make_mask(1, return_array=False, window_size=None) is None
    assert cache.make_mask(4, return_array=False, window_size=None) == "causal"
    mask = cache.make_mask(2, return_array=True, window_size=None)
    assert mask.shape == (2, cache.offset + 2)


def test_window_keeps_recent_tokens_fp16_and_encodes_what_leaves():
    k, v = kv(40)
    base = make()
    cache = VeloxKVCache(base.key_codec, base.value_codec, sink=2, window=8)
    ks = None
    for s, e in ((0, 1), (1, 5), (5, 6), (6, 30), (30, 31), (31, 40)):  # decode steps and chunks
        ks, vs = cache.update_and_fetch(k[:, :, s:e], v[:, :, s:e])
        assert ks.shape[2] == e and cache.n_recent == min(8, e - min(e, 2))
    exact = lambda x: x.astype(mx.float16).astype(mx.float32)
    assert mx.array_equal(ks[:, :, :2], exact(k[:, :, :2])) and mx.array_equal(ks[:, :, -8:], exact(k[:, :, -8:]))
    assert not mx.allclose(ks[:, :, 2:-8], k[:, :, 2:-8], atol=1e-3)
    # the codes equal a window-free cache's codes of the same tokens, however they arrived
    plain = make(sink=2)
    ref = plain.update_and_fetch(exact(k[:, :, :32]), exact(v[:, :, :32]))[0]
    assert mx.allclose(ks[:, :, 2:32], ref[:, :, 2:32], atol=1e-5)
    assert cache.coded == 30 and cache.nbytes == sum(b.nbytes for b in cache.keys + cache.values) + 2 * 3 * (2 + 8) * 64 * 2
    # trimming takes the window first, then codes; re-extending gives the same history
    assert cache.trim(12) == 12 and cache.offset == 28 and cache.coded == 26 and cache.n_recent == 0
    again = cache.update_and_fetch(k[:, :, 28:40], v[:, :, 28:40])[0]
    assert again.shape[2] == 40 and mx.allclose(again[:, :, -8:], ks[:, :, -8:])
