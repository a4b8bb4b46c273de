"""Calibration text: the shipped default corpus or a user's .txt/.jsonl file."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_CORPUS = DATA_DIR / "calib_python_docs.txt"
EVAL_CORPUS = DATA_DIR / "eval_python_docs.txt"


@dataclass
class CalibrationSet:
    """Token sequences [n_seq, seq_len] and where they came from."""

    tokens: np.ndarray
    corpus: str
    sha256: str


def read_text(path: Path) -> str:
    """Text of a .txt file, or the "text" fields of a .jsonl file joined by blank lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration data not found: {path}")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: each line must be a JSON object with a \"text\" field ({e})") from None
        raw = "\n\n".join(texts)
    return raw


def load_calibration(tokenizer, path: Path | None = None, num_tokens: int = 8192,
                     seq_len: int = 512) -> CalibrationSet:
    """Tokenize the corpus and cut it into ``num_tokens // seq_len`` sequences of ``seq_len``."""
    path = Path(path) if path else DEFAULT_CORPUS
    text = read_text(path)
    ids = np.array(tokenizer.encode(text), dtype=np.int32)
    n_seq = num_tokens // seq_len
    if n_seq < 1:
        raise ValueError(f"--calib-tokens ({num_tokens}) must be at least --calib-seq-len ({seq_len})")
    if len(ids) < n_seq * seq_len:
        raise ValueError(
            f"calibration data {path.name} has {len(ids)} tokens; at least {n_seq * seq_len} "
            f"are needed for --calib-tokens {num_tokens} with --calib-seq-len {seq_len}"
        )
    tokens = ids[: n_seq * seq_len].reshape(n_seq, seq_len)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return CalibrationSet(tokens=tokens, corpus=path.name, sha256=sha)
