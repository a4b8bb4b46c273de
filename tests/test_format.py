import copy
import json

import pytest

from velox.format import VeloxFormatError, check_artifacts, validate_kv_quant

KNOWN = {"spectral", "turboquant_mse"}


def valid(num_layers=2):
    return {
        "format_version": 1, "velox_version": "0.1.0", "default_method": "spectral",
        "methods": {"spectral": {"key_bits": 4, "value_bits": 4,
                                 "layers": [{"layer": i, "key_bits": 4, "value_bits": 4} for i in range(num_layers)]}},
        "model": {"num_layers": num_layers, "num_kv_heads": 2, "head_dim": 64},
        "artifacts": [{"file": "kv_quant.safetensors", "sha256": "0" * 64}],
    }


def mutate(path, value):
    kvq = valid()
    node = kvq
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return kvq


@pytest.mark.parametrize("path,value,message", [
    (["format_version"], 99, "newer than this velox supports"),
    (["format_version"], "1", "format_version must be an integer"),
    (["default_method"], "other", "default_method 'other'"),
    (["methods", "spectral", "layers"], [], "must list all 2 layers"),
    (["methods", "spectral", "layers", 1, "key_bits"], 12, "key_bits must be an integer in 1..8"),
    (["methods", "spectral", "layers", 0, "value_bits"], True, "value_bits must be an integer"),
    (["artifacts"], [{"file": "../../etc/passwd", "sha256": "x"}], "artifacts\\[0\\]"),
    (["model", "head_dim"], -64, "positive integers num_kv_heads and head_dim"),
    (["model", "num_layers"], 30, "model.num_layers is 30 but the model has 2 layers"),
    (["methods", "spectral", "sink"], -1, "methods.spectral.sink must be an integer in 0..4096"),
    (["methods", "spectral", "sink"], 10**9, "sink must be an integer"),
])
def test_invalid_fields_are_named(path, value, message):
    with pytest.raises(VeloxFormatError, match=message):
        validate_kv_quant(mutate(path, value), 2, KNOWN)


def test_unknown_method_is_named():
    kvq = valid()
    kvq["methods"]["evil"] = copy.deepcopy(kvq["methods"]["spectral"])
    with pytest.raises(VeloxFormatError, match="unknown method 'evil'"):
        validate_kv_quant(kvq, 2, KNOWN)


def test_valid_passes_and_artifacts_are_checked(tmp_path):
    kvq = validate_kv_quant(valid(), 2, KNOWN)
    with pytest.raises(VeloxFormatError, match="artifact missing"):
        check_artifacts(tmp_path, kvq)
    (tmp_path / "kv_quant.safetensors").write_bytes(b"tampered")
    with pytest.raises(VeloxFormatError, match="sha256 mismatch"):
        check_artifacts(tmp_path, kvq)


def test_load_without_kv_quant_or_with_broken_json(tmp_path):
    from velox.runtime.loader import read_kv_quant

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(VeloxFormatError, match="no kv_quant section"):
        read_kv_quant(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(VeloxFormatError, match="not valid JSON"):
        read_kv_quant(tmp_path)
