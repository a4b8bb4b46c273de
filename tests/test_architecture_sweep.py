"""Every model type the installed mlx_lm builds: velox supports it or refuses it clearly, and
docs/ARCHITECTURES.md (velox/data/architectures.json) says which (scripts/architecture_sweep.py)."""

from __future__ import annotations

import json

import pytest

from conftest import load_script
from velox.runtime.loader import TESTED_ARCHITECTURES, mlx_lm_model_types

sweep = load_script("architecture_sweep")
RECORDED = {r["model_type"]: r for r in json.loads(sweep.MATRIX_JSON.read_text())}
NO_PLAIN_CACHE = "no attention layer with a plain KVCache"


def test_the_matrix_covers_every_model_type():
    assert sorted(RECORDED) == mlx_lm_model_types()


@pytest.mark.parametrize("model_type", mlx_lm_model_types())
def test_architecture(model_type, tmp_path):
    """Converted with a data-free and a calibrated method and decoded fast and slow beside the
    native cache: nothing silently wrong or unclear, and the outcome is the recorded one."""
    result = sweep.check(model_type, tmp_path)
    assert result["status"] != "broken", result
    assert result["status"] == RECORDED[model_type]["status"], result


def test_most_decoder_types_with_plain_kv_caches_are_supported():
    """Of the types built here whose layers include plain-KVCache attention, at least 80% run."""
    with_plain = [r for r in RECORDED.values()
                  if r["status"] != "not built" and NO_PLAIN_CACHE not in r.get("reason", "")]
    supported = [r for r in with_plain if r["status"] in ("supported", "data-free only")]
    assert len(supported) >= 0.8 * len(with_plain), (len(supported), len(with_plain))


def test_tested_architectures_come_from_the_matrix():
    assert set(TESTED_ARCHITECTURES) == {t for t, r in RECORDED.items() if r["status"] in ("supported",
                                                                                            "data-free only")}
