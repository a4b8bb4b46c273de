"""End to end on the real SmolLM2-135M-Instruct: build, convert, load, generate, measure.

Quality is teacher-forced perplexity on ≥ 2048 tokens of the evaluation text (Python
docs FAQ/HOWTO pages, disjoint from the calibration pages): windows of 1024 tokens,
32-token prefill, then chunks of 16, so every scored token attends to the compressed
cache of all earlier tokens (comparisons between two compressed caches with a wide gap:
the first window only, COMPARE_WINDOWS). Compute is float32 on MLX's CPU backend.
"""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

import velox
from velox.convert.calib_data import EVAL_CORPUS
from velox.convert.cli import main as convert_main
from velox.eval import PerplexityResult, bytes_per_token, mlx_baseline_cache, teacher_forced_nll
from velox.format import sha256_file
from velox.runtime.cache import VeloxKVCache

pytestmark = pytest.mark.slow
WINDOWS = 3  # 3 × (1024 − 33) = 2973 scored tokens
# Comparisons between two compressed caches whose gap is far larger than the spread between
# windows score the first window only (991 tokens; a window costs ~25 s on a 2-core CPU).
# Measured per window (1 / 2 / 3): turboquant_mse 4-bit +5.7 / +5.4 / +5.0% vs mlx_lm 4-bit
# +14.9 / +14.7 / +12.0%; RateQuant 3-bit +14.4 / +15.0 / +12.2% vs uniform 3-bit
# +28.3 / +28.7 / +24.0%.
COMPARE_WINDOWS = 1
# The foundation issue's goals; measured +0.83% and +5.36% (docs/BENCHMARKS.md).
SPECTRAL_4BIT_MAX = 0.02
SPECTRAL_3BIT_MAX = 0.06


@pytest.fixture(scope="module", autouse=True)
def capture_once():
    """folder4, folder3 and folder_vq calibrate the same model on the same 8192 tokens: capture
    them once (~70 s each on a 2-core CPU; ~0.6 GB held for the module), the first conversion's
    activations reused by the next (same artifacts, byte for byte). The arrays are made read-only, so a calibration that wrote into them would fail here
    rather than change what a later conversion sees."""
    from mlx.utils import tree_flatten

    from velox.convert import pipeline

    real, memo = pipeline.capture, {}

    def capture(model, sequences, progress=True):
        weights = tuple((k, mx.sum(v.astype(mx.float32)).item()) for k, v in tree_flatten(model.parameters()))
        key = (weights, sequences.shape, sequences.tobytes())
        if key not in memo:
            memo[key] = real(model, sequences, progress=progress)
            for acts in filter(None, memo[key]):  # None: a layer velox leaves native
                for x in vars(acts).values():
                    x.flags.writeable = False
        return memo[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "capture", capture)
        yield


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


def first_windows(res, windows):
    """The first ``windows`` windows of a PerplexityResult (teacher_forced_nll scores them in order)."""
    return PerplexityResult(nll=res.nll[:windows])


def measure(folder, method, eval_tokens, fp16, windows=WINDOWS, with_bytes=True):
    """(ΔPPL vs fp16 on the first ``windows`` windows, cache bytes per token per layer or None)."""
    model, _ = velox.load(str(folder), kv=method)
    model.set_dtype(mx.float32)
    res = teacher_forced_nll(model, eval_tokens, model.make_cache, max_windows=windows)
    per_token = bytes_per_token(model, model.make_cache, eval_tokens, n=1024) / 30 if with_bytes else None
    fp16 = first_windows(fp16, windows)
    delta = res.ppl / fp16.ppl - 1
    print(f"\n{method} {folder.name}: PPL {res.ppl:.3f} (fp16 {fp16.ppl:.3f}, {100 * delta:+.2f}%, "
          f"{res.tokens} tokens)" + (f", {per_token:.0f} B/token/layer" if with_bytes else ""))
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
    delta_tq4, _ = measure(folder4, "turboquant_mse", eval_tokens, fp16_result, COMPARE_WINDOWS, with_bytes=False)
    model, _ = mlx_lm.load(str(smollm2_path))
    model.set_dtype(mx.float32)
    mlx4 = teacher_forced_nll(model, eval_tokens, mlx_baseline_cache(model, "mlx4"), max_windows=COMPARE_WINDOWS)
    delta_mlx4 = mlx4.ppl / first_windows(fp16_result, COMPARE_WINDOWS).ppl - 1
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
    # turboquant_mse is data-free, so calibration only feeds RateQuant: output errors on 4
    # sequences, loss weights on 2 (its per-layer KL forwards dominate the conversion, ~1 s per
    # 128 tokens each, 60 of them). 4 sequences of 64 tokens measured +13.9% over 3 windows
    # (+14.4% on the first), as good as 8 of 256 (+13.4%) and 4 of 128 (+12.5%); uniform: +27.0%.
    out = tmp_path / "rq"
    assert convert_main(["--hf-path", str(smollm2_path), "--mlx-path", str(out), "--kv", "turboquant_mse",
                         "--kv-bits", "3", "--kv-alloc", "ratequant", "--calib-tokens", "256",
                         "--calib-seq-len", "64", "--quiet"]) == 0
    entry = json.loads((out / "config.json").read_text())["kv_quant"]["methods"]["turboquant_mse"]
    assert entry["achieved_bits"] == 3
    assert any(set(layer["key_bits"] + layer["value_bits"]) != {3} for layer in entry["layers"])  # mixed widths
    rq, rq_bytes = measure(out, "turboquant_mse", eval_tokens, fp16_result, COMPARE_WINDOWS)
    uniform, _ = measure(folder3, "turboquant_mse", eval_tokens, fp16_result, COMPARE_WINDOWS, with_bytes=False)
    # Uniform's bytes as velox-convert measured them from its caches (per coded layer, 1024 tokens).
    uniform_bytes = json.loads((folder3 / "config.json").read_text())["kv_quant"]["methods"]["turboquant_mse"][
        "bytes_per_token_per_layer"]
    print(f"RateQuant {100 * rq:+.2f}% vs uniform {100 * uniform:+.2f}% at {rq_bytes:.0f} B/token/layer")
    assert rq_bytes == uniform_bytes == 3 * 2 * (24 + 2)  # same average bits, same norms
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


@pytest.fixture(scope="module")
def folder_pairs(smollm2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "smollm2-pairs"
    assert convert_main(["--hf-path", str(smollm2_path), "--mlx-path", str(out), "--kv", "spectral",
                         "--spectral-basis", "pairs", "--quiet"]) == 0
    return out


def decode_64(folder, method: str, eval_tokens, fast: bool, forced: bool) -> list[int]:
    """A 2048-token prompt of the evaluation text, then 64 decode steps: the argmax of each step,
    fed back (greedy) or, forced, the text's own next token fed instead."""
    model, _ = velox.load(str(folder), kv=method, fast=fast)
    model.set_dtype(mx.float32)
    cache = model.make_cache()
    logits = model(mx.array(eval_tokens[None, :2048]), cache=cache)
    tokens = []
    for i in range(64):
        tokens.append(mx.argmax(logits[0, -1]).item())
        logits = model(mx.array([[int(eval_tokens[2048 + i]) if forced else tokens[-1]]]), cache=cache)
    assert all(c.codes_only == fast for c in cache if isinstance(c, VeloxKVCache))
    return tokens


@pytest.mark.parametrize("which,method", [("folder4", "turboquant_mse"), ("folder_pairs", "spectral"),
                                          ("folder_vq", "commvq")])
def test_fast_path_greedy_tokens_match_decoding_the_history(request, eval_tokens, which, method):
    """The issue's exactness check on the real model: a 2048-token prompt of the evaluation text,
    then 64 greedy decode steps, attending from the codes (the CPU kernel here) or decoding the
    whole history every step: the same tokens."""
    folder = request.getfixturevalue(which)
    assert decode_64(folder, method, eval_tokens, True, False) == decode_64(folder, method, eval_tokens, False, False)


# measured: 64/64 and 56/64
LOW_BIT_MIN_AGREEMENT = {"vecinfer": 61, "rabitq": 53}


@pytest.mark.parametrize("method", sorted(LOW_BIT_MIN_AGREEMENT))
def test_low_bit_fast_path_agrees_with_decoding_the_history(folder_vq, eval_tokens, method):
    """vecinfer's 2-bit and rabitq's 1-bit keys: the two paths' float differences (sums in another
    order) flip a few codes of the tokens coded after them (a 1-bit code flips with the sign of a
    near-zero coordinate), so free-running greedy runs part at a near-tie (measured: step 49 for
    vecinfer, 38 for rabitq; top-2 margins down to 0.01). Fed the text's own next tokens instead,
    the argmax agrees at most of 64 steps."""
    runs = [decode_64(folder_vq, method, eval_tokens, fast, True) for fast in (True, False)]
    agree = sum(a == b for a, b in zip(*runs))
    print(f"\n{method}: fast and decode paths agree at {agree}/64 teacher-forced steps")
    assert agree >= LOW_BIT_MIN_AGREEMENT[method]
