"""Registers and instruction mix of the decode kernel's passes, from its SASS (no GPU needed).

Compiles ``velox/kernels/source.py``'s decode kernel for sm_90 with NVRTC the way MLX's
``cuda_kernel`` would (the dev extra's nvidia-cuda-nvrtc wheel), disassembles it with nvdisasm
(``pip install nvidia-cuda-nvdisasm``), and counts the instructions from the first to the last
mma of each tensor-core pass: the scores pass, then the values pass (each loop body holds
PFT = 2 tiles of 16 tokens; a lane decodes D / 2 codes per tile).

    python scripts/kernel_sass.py
    python scripts/kernel_sass.py --set R=3 --set D=64 --set KSH=false --set VSH=false
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from velox.kernels import source  # noqa: E402

@lru_cache(maxsize=None)
def _tests_helpers():
    """tests/test_kernel_sources.py: the translation unit MLX builds and the NVRTC loader."""
    spec = importlib.util.spec_from_file_location("test_kernel_sources", ROOT / "tests" / "test_kernel_sources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cubin(template: dict) -> tuple[bytes, str]:
    """(sm_90 cubin, ptxas log) of the decode kernel with these template arguments (the tests'
    benchmark shape, BENCH_TEMPLATE, where not given)."""
    helpers = _tests_helpers()
    header, body = (source.compact(x) for x in source.render("decode", "cuda"))
    rc, log, binary = helpers.nvrtc_build(helpers.decode_unit(header, body, **template), "sm_90", ("--ptxas-options=-v",))
    if rc != 0:
        raise SystemExit(log[-3000:])
    return binary, log


def nvdisasm() -> str:
    found = shutil.which("nvdisasm")
    if found:
        return found
    import nvidia

    for base in nvidia.__path__:
        for path in glob.glob(f"{base}/*/bin/nvdisasm"):
            return path
    raise SystemExit("no nvdisasm: pip install nvidia-cuda-nvdisasm")


def opcode(line: str) -> str:
    words = line.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a template argument")
    args = ap.parse_args(argv)
    template = dict(_tests_helpers().BENCH_TEMPLATE)
    for item in args.set:
        name, value = item.split("=")
        template[name] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    binary, log = cubin(template)
    print(", ".join(f"{k}={v}" for k, v in template.items()))
    print("ptxas:", "; ".join(re.findall(r"Used \d+ registers|\d+ bytes spill stores|\d+ bytes spill loads", log)))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(binary)
        f.flush()
        sass = subprocess.run([nvdisasm(), "-c", f.name], capture_output=True, text=True, check=True).stdout
    code = [m.group(1).strip() for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", sass)]
    mma = [i for i, line in enumerate(code) if "HMMA" in line]
    if len(mma) < 2:
        print("no tensor-core passes (sm_80+ only)")
        return 0
    half = len(mma) // 2  # the scores pass's mma, then the values pass's
    for name, (a, b) in [("scores", (mma[0], mma[half - 1])), ("values", (mma[half], mma[-1]))]:
        ops = Counter(opcode(line) for line in code[a:b + 1])
        n = b + 1 - a
        codes = 2 * 16 * template["D"] // 32  # a lane's codes in two 16-token tiles
        print(f"{name} pass loop: {n} instructions for 2 tiles ({n / codes:.1f} per code of a lane); "
              + ", ".join(f"{k} {v}" for k, v in ops.most_common(8)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
