"""End to end on the real SmolLM2-135M-Instruct: build, convert, load, generate, measure.

Quality is teacher-forced perplexity on ≥ 2048 tokens of the evaluation text (Python
docs FAQ/HOWTO pages, disjoint from the calibration pages): windows of 1024 tokens,
32-token prefill, then chunks of 16, so every scored token attends to the compressed
cache of all earlier tokens. Compute is float32 on MLX's CPU backend.
"""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

import velox
from velox.convert.calib_data import EVAL_CORPUS
from velox.convert.cli import main as convert_main
from velox.eval import bytes_per_token, mlx_baseline_cache, teacher_forced_nll
from velox.format import sha256_file
from velox.runtime.cache import VeloxKVCache

pytestmark = pytest.mark.slow
WINDOWS = 3  # 3 × (1024 − 33) = 2973 scored tokens
# The foundation issue's goals; measured +0.83% and +5.36% (docs/BENCHMARKS.md).
SPECTRAL_4BIT_MAX = 0.02
SPECTRAL_3BIT_MAX = 0.06


def chat(model, tok, question, **kw):
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return mlx_lm.generate(model, tok, prompt=prompt, max_tokens=30, **kw)


@pytest.fixture(scope="module")
def eval_tokens(smollm2_path):
    _, tok = mlx_lm.load(str(smollm2_path))
    return np.array(tok.encode(EVAL_CORPUS.read_text()))


@pytest.fixture(scope="module")
def fp16_result(smollm2_path, eval_tokens):
    model, _ = mlx_lm.load(str(smollm2_path))
    model.set_dtype(mx.float32)
    return teacher_forced_nll(model, eval_tokens, mlx_baseline_cache(model, "fp16"), max_windows=WINDOWS)


def convert(src, out, *extra):
    assert convert_main(["--hf-path", str(src), "--mlx-path", str(out), "--kv", "spectral,turboquant_mse",
                         "--quiet", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def folder4(smollm2_path, tmp_path_factory):
    return convert(smollm2_path, tmp_path_factory.mktemp("s4") / "smollm2-kv")


@pytest.fixture(scope="module")
def folder3(smollm2_path, tmp_path_factory):
    return convert(smollm2_path, tmp_path_factory.mktemp("s3") / "smollm2-kv3",
                   "--kv-key-bits", "3", "--kv-value-bits", "3")


def test_real_model_is_right(smollm2_path, fp16_result):
    model, tok = mlx_lm.load(str(smollm2_path))
    model.set_dtype(mx.float32)
    assert "Paris" in chat(model, tok, "What is the capital of France?")
    # SmolLM2 digit splitting survives the tokenizer round trip (transformers 5 trap).
    assert len(tok.encode("12345")) == 5
    assert fp16_result.tokens >= 2048
    print(f"\nfp16 mean NLL {fp16_result.mean_nll:.4f} nats, PPL {fp16_result.ppl:.3f}")
    assert 2.5 < fp16_result.mean_nll < 3.3


def test_folder_loads_generates_and_is_recorded(folder4):
    kvq = json.loads((folder4 / "config.json").read_text())["kv_quant"]
    assert kvq["calibration"]["tokens"] == 8192 and kvq["model"] == {"num_layers": 30, "num_kv_heads": 3,
                                                                    "head_dim": 64}
    assert kvq["artifacts"][0]["sha256"] == sha256_file(folder4 / "kv_quant.safetensors")
    for method in ("spectral", "turboquant_mse"):
        model, tok = velox.load(str(folder4), kv=method)
        model.set_dtype(mx.float32)
        cache = mlx_lm.models.cache.make_prompt_cache(model)
        assert "Paris" in chat(model, tok, "What is the capital of France?", prompt_cache=cache)
        assert all(isinstance(c, VeloxKVCache) for c in cache)


def measure(folder, method, eval_tokens, fp16):
    model, _ = velox.load(str(folder), kv=method)
    model.set_dtype(mx.float32)
    res = teacher_forced_nll(model, eval_tokens, model.make_cache, max_windows=WINDOWS)
    per_token = bytes_per_token(model, model.make_cache, eval_tokens, n=1024) / 30
    delta = res.ppl / fp16.ppl - 1
    print(f"\n{method} {folder.name}: PPL {res.ppl:.3f} (fp16 {fp16.ppl:.3f}, {100 * delta:+.2f}%), "
          f"{per_token:.0f} B/token/layer")
    return delta, per_token


def test_spectral_4bit_quality_and_bytes(folder4, eval_tokens, fp16_result):
    delta, per_token = measure(folder4, "spectral", eval_tokens, fp16_result)
    # 3 heads × (K + V) × (64 × 4 bits = 32 B codes + 2 B fp16 norm) = 204 B; fp16 = 768 B
    assert per_token == 204
    assert delta < SPECTRAL_4BIT_MAX


def test_spectral_3bit_quality(folder3, eval_tokens, fp16_result):
    delta, per_token = measure(folder3, "spectral", eval_tokens, fp16_result)
    assert per_token == 3 * 2 * (24 + 2)
    assert delta < SPECTRAL_3BIT_MAX


def test_broken_cache_is_detected_with_confidence(smollm2_path, eval_tokens, fp16_result):
    from velox.eval import bootstrap_delta

    class DropHalf:
        def encode(self, x, offset=0):
            return (x,)

        def decode(self, x, offset=0):
            return mx.concatenate([x[..., :32], mx.zeros_like(x[..., 32:])], axis=-1)

    model, _ = mlx_lm.load(str(smollm2_path))
    model.set_dtype(mx.float32)
    bad = teacher_forced_nll(model, eval_tokens, lambda: [VeloxKVCache(DropHalf(), DropHalf()) for _ in range(30)],
                             max_windows=WINDOWS)
    lo, hi = bootstrap_delta(bad.nll, fp16_result.nll)
    assert 0.05 < lo <= hi


def test_turboquant_and_mlx_baselines_recorded(folder4, smollm2_path, eval_tokens, fp16_result):
    delta_tq4, _ = measure(folder4, "turboquant_mse", eval_tokens, fp16_result)
    model, _ = mlx_lm.load(str(smollm2_path))
    model.set_dtype(mx.float32)
    mlx4 = teacher_forced_nll(model, eval_tokens, mlx_baseline_cache(model, "mlx4"), max_windows=WINDOWS)
    delta_mlx4 = mlx4.ppl / fp16_result.ppl - 1
    print(f"mlx_lm 4-bit: {100 * delta_mlx4:+.2f}%  turboquant_mse 4-bit: {100 * delta_tq4:+.2f}%")
    assert delta_tq4 < delta_mlx4 / 2  # velox at 4 bits several times better than mlx_lm's 4-bit


# Calibrated VQ methods at their defaults, regression bounds over what docs/BENCHMARKS.md
# measured on this protocol (vecinfer 2/4 +9.7%, commvq 2/4 +26.0%, rabitq 1/4 +31.9%;
# calibration moves these by about ±2 points). mlx_lm's 2-bit cache: +3200%.
VQ_MAX_DELTA = {"vecinfer": 0.15, "commvq": 0.35, "rabitq": 0.45}
VQ_BYTES = {"vecinfer": 3 * (16 + 34), "commvq": 3 * (16 + 2 + 34), "rabitq": 3 * (8 + 1 + 2 + 34)}


@pytest.fixture(scope="module")
def folder_vq(smollm2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("vq") / "smollm2-vq"
    assert convert_main(["--hf-path", str(smollm2_path), "--mlx-path", str(out),
                         "--kv", "vecinfer,rabitq,commvq,spectral", "--quiet"]) == 0
    return out


def test_vq_methods_calibrated_into_one_folder(folder_vq):
    kvq = json.loads((folder_vq / "config.json").read_text())["kv_quant"]
    assert kvq["default_method"] == "vecinfer"
    bits = {m: (e["key_bits"], e["value_bits"]) for m, e in kvq["methods"].items()}
    assert bits == {"vecinfer": (2, 4), "rabitq": (1, 4), "commvq": (2, 4), "spectral": (4, 4)}
    # Fit time is a benchmark figure (docs/BENCHMARKS.md), not asserted here.
    print("\nfit seconds:", {m: e["fit_seconds"] for m, e in kvq["methods"].items()})
    assert all(e["fit_seconds"] > 0 for e in kvq["methods"].values())
    # Generation runs through every method's caches. Whether a 30-token greedy answer
    # stays on "Paris" with 1–2-bit keys flips with calibration noise on this 135M model
    # (seen both ways for each method), so quality is asserted by perplexity below.
    for method in VQ_BYTES:
        model, tok = velox.load(str(folder_vq), kv=method)
        cache = mlx_lm.models.cache.make_prompt_cache(model)
        assert len(chat(model, tok, "What is the capital of France?", prompt_cache=cache)) > 0
        assert all(isinstance(c, VeloxKVCache) and c.method == method and c.offset > 0 for c in cache)


@pytest.mark.parametrize("method", ["vecinfer", "commvq", "rabitq"])
def test_vq_method_quality_and_bytes(folder_vq, eval_tokens, fp16_result, method):
    delta, per_token = measure(folder_vq, method, eval_tokens, fp16_result)
    assert per_token == VQ_BYTES[method]  # codes + per-vector scalars, nothing else
    assert delta < VQ_MAX_DELTA[method]


# Issue 5's data-free methods at 3 bits (keys and values), one folder; calibration only
# captures activations, so a short corpus suffices.
DATA_FREE_BYTES = {"turboquant_prod": 3 * (24 + 4 + 26), "turboquant_rvq": 3 * 2 * 26,
                   "polar": 3 * 2 * 26, "qjl": 3 * (24 + 2 + 26)}


@pytest.fixture(scope="module")
def folder_data_free(smollm2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("df") / "smollm2-df"
    assert convert_main(["--hf-path", str(smollm2_path), "--mlx-path", str(out), "--kv",
                         ",".join(DATA_FREE_BYTES), "--kv-bits", "3", "--calib-tokens", "1024", "--quiet"]) == 0
    return out


def test_data_free_methods_generate_and_hold_exact_bytes(folder_data_free, eval_tokens):
    for method, per_token in DATA_FREE_BYTES.items():
        model, tok = velox.load(str(folder_data_free), kv=method)
        cache = mlx_lm.models.cache.make_prompt_cache(model)
        assert len(chat(model, tok, "What is the capital of France?", prompt_cache=cache)) > 0
        assert bytes_per_token(model, model.make_cache, eval_tokens, n=1024) / 30 == per_token


def test_ratequant_beats_uniform_at_the_same_average(smollm2_path, folder3, eval_tokens, fp16_result, tmp_path):
    # turboquant_mse at 3 bits on average: RateQuant's per-head widths vs 3/3 everywhere.
    out = tmp_path / "rq"
    assert convert_main(["--hf-path", str(smollm2_path), "--mlx-path", str(out), "--kv", "turboquant_mse",
                         "--kv-bits", "3", "--kv-alloc", "ratequant", "--calib-tokens", "2048",
                         "--calib-seq-len", "256", "--quiet"]) == 0
    entry = json.loads((out / "config.json").read_text())["kv_quant"]["methods"]["turboquant_mse"]
    assert entry["achieved_bits"] == 3
    rq, rq_bytes = measure(out, "turboquant_mse", eval_tokens, fp16_result)
    uniform, uniform_bytes = measure(folder3, "turboquant_mse", eval_tokens, fp16_result)
    assert rq_bytes == uniform_bytes  # same average bits, same norms
    assert rq < uniform


# The same folder with a 64-token fp16 window (--kv-window 64, KIVI's residual window):
# docs/BENCHMARKS.md measured vecinfer +1.3%, commvq +4.6%, rabitq +7.6%; bounds leave room
# for calibration noise.
WINDOW_MAX_DELTA = {"vecinfer": 0.03, "commvq": 0.07, "rabitq": 0.11}


@pytest.mark.parametrize("method", list(WINDOW_MAX_DELTA))
def test_vq_method_quality_with_a_recent_window(folder_vq, eval_tokens, fp16_result, method):
    model, _ = velox.load(str(folder_vq), kv=method)
    model.set_dtype(mx.float32)

    def make_cache():
        caches = model.make_cache()
        for c in caches:
            c.window = 64
        return caches

    res = teacher_forced_nll(model, eval_tokens, make_cache, max_windows=WINDOWS)
    delta = res.ppl / fp16_result.ppl - 1
    print(f"\n{method} window 64: PPL {res.ppl:.3f} ({100 * delta:+.2f}%)")
    assert delta < WINDOW_MAX_DELTA[method]
