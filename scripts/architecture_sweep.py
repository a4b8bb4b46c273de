"""Every model type the installed mlx_lm builds, converted and run with velox.

For each type: a tiny random instance (``tiny_configs.py``) saved as a Hugging Face folder
with a byte-level tokenizer (loads in ms; SmolLM2's takes a second), converted with a data-free method (turboquant_mse) and a calibrated
one (commvq, keys coded before RoPE), loaded with the fast path on and off, and run through
a chunked prefill and decode steps beside the model's own caches. Outcomes:

- ``supported``: both methods convert and load, the fast and decode paths agree, and their
  logits track the native cache within the codes' error;
- ``data-free only``: the calibrated method is refused with a clear reason (keys and values
  of different head dims, or queries velox cannot record);
- ``refused``: velox refuses the type (``UnsupportedArchitecture``) and says why;
- ``not built``: the tiny instance could not be made here (a limit of this harness), or
  mlx_lm's own model fails on it with its own caches;
- ``broken``: anything else (an unclear error, or logits off). tests/test_architecture_sweep.py
  fails on it.

    python scripts/architecture_sweep.py            # every type: docs/ARCHITECTURES.md, velox/data/architectures.json
    python scripts/architecture_sweep.py llama olmo # just these, printed
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_configs  # noqa: E402

METHODS = ("turboquant_mse", "commvq")
DATA_FREE = METHODS[0]
MATRIX_JSON = ROOT / "velox" / "data" / "architectures.json"
MATRIX_DOC = ROOT / "docs" / "ARCHITECTURES.md"
# Relative logit error allowed between the fast and decode paths (same codes) and between
# the decode path and the native cache (the codes' error: 4-bit turboquant_mse, 2-bit commvq keys).
FAST_VS_DECODE = 1e-2
CODES_VS_NATIVE = {"turboquant_mse": 0.5, "commvq": 1.0}


def write_byte_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer with no merges (256 byte tokens and an end token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    # PreTrainedTokenizerFast: transformers then uses tokenizer.json as it is
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
        "model_max_length": 1 << 20}))


def write_folder(model_type: str, folder: Path) -> None:
    """The tiny random ``model_type`` saved as an HF folder, after a prefill and decode steps
    through its own caches (a model mlx_lm itself cannot run is no test of velox)."""
    import mlx_lm
    from mlx.utils import tree_flatten

    from velox.runtime.layers import native_caches

    model, config = tiny_configs.build(model_type)
    try:
        mx.eval(decode_logits(model, native_caches(model)))
    except Exception as e:
        raise RuntimeError(f"mlx_lm's own model fails with its own caches: {type(e).__name__}: {e}") from None
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = {k: v for k, v in config.items() if k not in ("bos_token_id", "eos_token_id")}
    (folder / "config.json").write_text(json.dumps(config))
    write_byte_tokenizer(folder)
    try:  # mlx_lm.load's own checks (transformers' config validators, the model's sanitize)
        mlx_lm.load(str(folder))
    except Exception as e:
        raise RuntimeError(f"mlx_lm.load fails on the tiny folder: {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[-1]}") from None


def decode_logits(model, caches, n: int = 20) -> mx.array:
    """Last logits of a 12-token prefill and of n − 12 single-token steps -> [steps, vocab]."""
    ids = mx.array(np.random.default_rng(0).integers(0, 256, n))[None]  # ids of the byte tokenizer
    out = [model(ids[:, :12], cache=caches)[:, -1]]
    out += [model(ids[:, t:t + 1], cache=caches)[:, -1] for t in range(12, n)]
    return mx.concatenate(out).astype(mx.float32)


def rel_err(a: mx.array, b: mx.array) -> float:
    return (mx.linalg.norm(a - b) / (mx.linalg.norm(b) + 1e-30)).item()


def run_methods(folder: Path, methods: list[str]) -> dict[str, dict]:
    """Each method with the fast path on and off, on one loaded model -> per method the
    errors and the layer counts."""
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    import velox
    from velox.runtime.cache import VeloxKVCache
    from velox.runtime.layers import native_caches
    from velox.runtime.loader import install_kv_caches, read_kv_quant

    model, tok = velox.load(str(folder), kv=methods[0])
    kvq = read_kv_quant(folder)
    ref = decode_logits(model, native_caches(model))
    out = {}
    for m in methods:
        install_kv_caches(model, folder, kvq, m, fast=False)
        slow = decode_logits(model, make_prompt_cache(model))
        install_kv_caches(model, folder, kvq, m, fast=True)
        caches = make_prompt_cache(model)
        fast = decode_logits(model, caches)
        coded = [c for c in caches if isinstance(c, VeloxKVCache)]
        out[m] = {"fast_vs_decode": rel_err(fast, slow), "decode_vs_native": rel_err(slow, ref),
                  "coded_layers": len(coded), "fast_layers": sum(c.fast for c in coded), "layers": len(caches)}
    text = mlx_lm.generate(model, tok, prompt="Hello there", max_tokens=3)
    if not isinstance(text, str):
        raise TypeError(f"mlx_lm.generate gave {type(text).__name__}")
    return out


def check(model_type: str, root: Path) -> dict:
    """Convert, load and run one model type -> {model_type, status, reason, ...}."""
    from velox.convert.pipeline import convert
    from velox.runtime.layers import UnsupportedArchitecture

    out = {"model_type": model_type}
    src, dst = root / f"{model_type}-hf", root / f"{model_type}-kv"
    if model_type in tiny_configs.UNBUILDABLE:
        return dict(out, status="not built", reason=tiny_configs.UNBUILDABLE[model_type])
    try:
        write_folder(model_type, src)
    except Exception as e:  # noqa: BLE001 - the harness's limit, reported as such
        return dict(out, status="not built", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    methods = list(METHODS)
    try:
        try:
            convert(str(src), str(dst), kv=",".join(methods), calib_tokens=64, calib_seq_len=32, progress=False)
        except UnsupportedArchitecture:
            raise
        except ValueError as e:
            if "use a data-free method" not in str(e):
                raise
            out["reason"] = str(e)
            methods = [DATA_FREE]
            convert(str(src), str(dst), kv=DATA_FREE, calib_tokens=64, calib_seq_len=32, progress=False)
        runs = run_methods(dst, methods)
    except UnsupportedArchitecture as e:
        return dict(out, status="refused", reason=str(e))
    except Exception as e:  # noqa: BLE001 - what the sweep exists to find
        tb = traceback.format_exc().strip().splitlines()
        return dict(out, status="broken", reason=f"{type(e).__name__}: {e}", traceback=tb[-6:])
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
    out["runs"] = {m: {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for m, r in runs.items()}
    wrong = [f"{m}: fast path {r['fast_vs_decode']:.3g} off the decode path" for m, r in runs.items()
             if not r["fast_vs_decode"] <= FAST_VS_DECODE]
    wrong += [f"{m}: logits {r['decode_vs_native']:.3g} off the native cache" for m, r in runs.items()
              if not r["decode_vs_native"] <= CODES_VS_NATIVE[m]]
    if wrong:
        return dict(out, status="broken", reason="; ".join(wrong))
    return dict(out, status="supported" if len(methods) == len(METHODS) else "data-free only")


def sweep(model_types: list[str], progress: bool = True) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in model_types:
            t0 = time.perf_counter()
            r = check(t, Path(tmp))
            r["seconds"] = round(time.perf_counter() - t0, 2)
            results.append(r)
            if progress:
                print(f"{t}: {r['status']}" + (f" ({r['reason']})" if r.get("reason") else ""), flush=True)
    return results


def matrix_markdown(results: list[dict]) -> str:
    """docs/ARCHITECTURES.md from the sweep's results."""
    import mlx_lm

    count = lambda s: sum(r["status"] == s for r in results)
    lines = [
        "# Architectures",
        "",
        f"Generated by `python scripts/architecture_sweep.py` with mlx_lm {mlx_lm.__version__}: every model type",
        "it builds, as a tiny random instance, converted with `turboquant_mse` (data-free) and `commvq`",
        "(calibrated, keys coded before RoPE), loaded with the fast path on and off, and decoded beside the",
        "model's own caches. `tests/test_architecture_sweep.py` re-runs it and checks this table.",
        "",
        f"{count('supported')} supported, {count('data-free only')} data-free methods only, "
        f"{count('refused')} refused, {count('not built')} not built by the harness, "
        f"{count('broken')} broken, of {len(results)} model types.",
        "",
        "Layers: coded (VeloxKVCache) / all; fast: coded layers that attend from the codes (their attention",
        "reaches velox's dispatcher with their cache's own keys and values; the others get the decoded history).",
        "",
        "| model type | status | layers coded / all | fast | note |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        run = next(iter(r.get("runs", {}).values()), None)
        layers = f"{run['coded_layers']} / {run['layers']}" if run else ""
        fast = f"{run['fast_layers']}" if run else ""
        note = r.get("reason", "").replace("|", "\\|").replace(" (docs/ARCHITECTURES.md lists what velox supports)", "")
        lines.append(f"| {r['model_type']} | {r['status']} | {layers} | {fast} | {note} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from velox.runtime.loader import mlx_lm_model_types

    types = sys.argv[1:] or mlx_lm_model_types()
    results = sweep(types)
    if sys.argv[1:]:
        print(json.dumps(results, indent=1))
        return
    MATRIX_JSON.write_text(json.dumps([{k: r[k] for k in ("model_type", "status", "reason") if k in r}
                                       for r in results], indent=1) + "\n")
    MATRIX_DOC.write_text(matrix_markdown(results))
    print(f"{sum(r['seconds'] for r in results):.0f} s for {len(results)} model types")
    print(f"wrote {MATRIX_JSON.relative_to(ROOT)} and {MATRIX_DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
