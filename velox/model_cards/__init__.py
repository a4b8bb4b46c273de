"""Model card (README.md) rendering for converted folders."""

from __future__ import annotations

from pathlib import Path
from string import Template

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


def render_card(kvq: dict, base_model: str, name: str, repo: str | None = None) -> str:
    """README.md text for a folder whose config.json carries ``kvq``."""
    methods = kvq["methods"]
    rows = "\n".join(
        f"| `{m}` | {e['key_bits']} | {e['value_bits']} | {e.get('fit_seconds', 0):.1f} | {method_notes(e)} |"
        for m, e in methods.items()
    )
    cal = kvq.get("calibration", {})
    calibration = (
        f"Calibrated on {cal.get('tokens', '?')} tokens of `{cal.get('corpus', '?')}` "
        f"(sha256 `{str(cal.get('sha256', ''))[:16]}…`) in sequences of {cal.get('seq_len', '?')}, "
        f"seed {cal.get('seed', '?')}; capture took {cal.get('capture_seconds', 0):.1f} s."
    )
    tags = ["mlx", "velox", "kv-cache-quantization", *methods]
    return Template(TEMPLATE.read_text()).substitute(
        base_model=base_model,
        tags="\n".join(f"- {t}" for t in tags),
        name=name,
        velox_url=VELOX_URL,
        velox_version=kvq["velox_version"],
        methods_table=rows,
        default_method=kvq["default_method"],
        calibration=calibration,
        repo=repo or name,
        quality=f"{QUALITY_START}\n{QUALITY_END}",
        format_version=kvq["format_version"],
    )
