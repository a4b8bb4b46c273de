"""A model folder is data: nothing in velox may unpickle, eval or run remote code.

Scans the package source, so a later change that reaches for pickle or
``trust_remote_code=True`` fails here instead of shipping.
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "velox"
SOURCES = sorted(PACKAGE.rglob("*.py"))

# Modules whose import alone means an object graph can be rebuilt from bytes.
FORBIDDEN_IMPORTS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
# Text patterns ast cannot see as calls (keyword arguments, torch.load's pickle).
FORBIDDEN_TEXT = [
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(..., allow_pickle=True)"),
    (re.compile(r"trust_remote_code\s*=\s*True"), "trust_remote_code=True"),
    (re.compile(r"\btorch\.load\s*\("), "torch.load (unpickles)"),
    (re.compile(r"\bweights_only\s*=\s*False"), "weights_only=False"),
]


def violations(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    """Every forbidden import, call or keyword in one source file, as 'file:line: what'."""
    text = path.read_text()
    rel = path.relative_to(root)
    found = []
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            names = []
        found += [f"{rel}:{node.lineno}: imports {n}" for n in names if n in FORBIDDEN_IMPORTS]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
            found.append(f"{rel}:{node.lineno}: calls {node.func.id}()")
        if isinstance(node, ast.keyword) and node.arg in ("allow_pickle", "trust_remote_code") \
                and not (isinstance(node.value, ast.Constant) and node.value.value is False):
            found.append(f"{rel}:{node.lineno}: {node.arg}= not literally False")
    for pattern, what in FORBIDDEN_TEXT:
        for m in pattern.finditer(text):
            found.append(f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {what}")
    return found


def test_package_sources_found():
    assert len(SOURCES) > 20 and PACKAGE / "format.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_code_execution_from_data(path):
    assert violations(path) == []


def test_scanner_catches_each_pattern(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import pickle\nfrom joblib import load\nx = eval('1')\nnp.load(f, allow_pickle=True)\n"
                      "AutoModel.from_pretrained(p, trust_remote_code=flag)\ntorch.load(f)\n")
    hits = "\n".join(violations(sample, root=tmp_path))
    for what in ("imports pickle", "imports joblib", "calls eval()", "allow_pickle=True",
                 "trust_remote_code= not literally False", "torch.load"):
        assert what in hits, what
