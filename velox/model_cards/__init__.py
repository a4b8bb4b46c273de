"""Model card (README.md) rendering for converted folders."""

from __future__ import annotations

from pathlib import Path
from string import Template
from typing import Optional

from huggingface_hub import ModelCardData

TEMPLATE = Path(__file__).with_name("template.md")
VELOX_URL = "https://pypi.org/project/velox-kv/"
# velox-eval --update-card replaces what stands between these markers.
QUALITY_START = "<!-- velox-eval:start -->"
QUALITY_END = "<!-- velox-eval:end -->"


def method_notes(entry: dict) -> str:
    """What else shapes a method's caches: allocation, fp16 regions, options."""
    notes = []
    if entry.get("alloc") == "ratequant":
        notes.append(f"RateQuant: {entry.get('achieved_bits')} bits on average, per (layer, KV head, K/V)")
    notes += [f"{k} {entry[k]} fp16 tokens" for k in ("sink", "window") if entry.get(k)]
    notes += [f"{k} {v}" for k, v in entry.get("options", {}).items()]
    return "; ".join(notes)


def fp16_bytes_per_token_per_layer(kvq: dict) -> int:
    """What an fp16 KV cache holds per token in one layer: keys and values, H × D × 2 bytes each."""
    model = kvq["model"]
    return 2 * model["num_kv_heads"] * (model["head_dim"] + model.get("value_head_dim", model["head_dim"]))


def describe_weights(weights: Optional[dict]) -> str:
    """One line for the pipeline's weight_quantization() dict (None: full precision)."""
    if weights is None:
        return "full precision (not quantized)"
    return (f"{weights['bits']}-bit {weights['mode']}, group size {weights['group_size']} "
            f"({weights['bits_per_weight']:.2f} bits per weight)")


def weights_sentence(weights: Optional[dict]) -> str:
    """How the card's folder came by its weights."""
    if weights is None:
        return "The weights are unchanged."
    if weights["by"] == "input":
        return f"The weights are kept as the input quantized them: {describe_weights(weights)}."
    return (f"The weights are quantized by {weights['by']} to {describe_weights(weights)}, and the KV "
            "caches were calibrated on that quantized model.")


def front_matter(base_model: str, methods: list[str], weights: Optional[dict]) -> str:
    """The card's YAML header (huggingface_hub writes it, so names are quoted as YAML needs)."""
    tags = ["mlx", "velox", "kv-cache-quantization", *methods]
    extra = {}
    if weights is not None:
        tags += ["quantized", f"{weights['bits']}-bit"] + ([weights["mode"]] if weights["mode"] != "affine" else [])
        if weights["by"] != "input":
            extra["base_model_relation"] = "quantized"
    data = ModelCardData(library_name="mlx", base_model=base_model, pipeline_tag="text-generation",
                         tags=tags, **extra)
    return data.to_yaml()


def render_card(kvq: dict, base_model: str, name: str, measure_tokens: int, repo: str | None = None,
                weights: Optional[dict] = None) -> str:
    """README.md text for a folder whose config.json carries ``kvq``.

    measure_tokens: the token count each method's bytes_per_token_per_layer was measured at.
    repo: the Hub repo id the usage examples name (default: the folder name ``name``).
    weights: the pipeline's weight_quantization() dict, None for full-precision weights.
    """
    methods = kvq["methods"]
    fp16 = fp16_bytes_per_token_per_layer(kvq)
    rows = "\n".join(
        f"| `{m}` | {e['key_bits']} | {e['value_bits']} | {e['bytes_per_token_per_layer']:.1f} | "
        f"{fp16 / e['bytes_per_token_per_layer']:.1f}× | {e.get('fit_seconds', 0):.1f} | {method_notes(e)} |"
        for m, e in methods.items()
    )
    cal = kvq.get("calibration", {})
    calibration = (
        f"Calibrated on {cal.get('tokens', '?')} tokens of `{cal.get('corpus', '?')}` "
        f"(sha256 `{str(cal.get('sha256', ''))[:16]}…`) in sequences of {cal.get('seq_len', '?')}, "
        f"seed {cal.get('seed', '?')}; capture took {cal.get('capture_seconds', 0):.1f} s."
    )
    provenance = f"; weights quantized by {weights['by']}" if weights and weights["by"] != "input" else ""
    return Template(TEMPLATE.read_text()).substitute(
        front_matter=front_matter(base_model, list(methods), weights).strip(),
        base_model=base_model,
        name=name,
        velox_url=VELOX_URL,
        velox_version=kvq["velox_version"],
        weights=weights_sentence(weights),
        methods_table=rows,
        fp16_bytes=fp16,
        measure_tokens=measure_tokens,
        default_method=kvq["default_method"],
        calibration=calibration,
        repo=repo or name,
        quality=f"{QUALITY_START}\nQuality not measured yet: `velox-eval --model FOLDER --update-card` "
                f"writes it here.\n{QUALITY_END}",
        format_version=kvq["format_version"],
        provenance=provenance,
    )
