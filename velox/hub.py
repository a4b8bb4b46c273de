"""Hugging Face Hub upload: ``velox-upload PATH user/name`` and ``velox-convert --upload-repo``.

Downloads need nothing here: ``velox.load("user/name")`` resolves a repo id with
``snapshot_download`` (``velox.runtime.loader.resolve_path``). The token comes from the
usual places (``HF_TOKEN``, ``huggingface-cli login``), as huggingface_hub finds it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from . import __version__
from .format import VeloxFormatError, check_artifacts
from .runtime.loader import read_kv_quant


def upload(folder: str | Path, repo_id: str, private: bool = False, token: Optional[str] = None) -> str:
    """Create ``repo_id`` (if it does not exist) and upload ``folder`` to it. Returns the repo URL.

    The folder is checked first (kv_quant section, artifact sha256) so that nothing
    ``velox.load`` would refuse gets published.
    """
    folder = Path(folder)
    check_artifacts(folder, read_kv_quant(folder))
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message=f"Upload {folder.name} (velox {__version__})")
    return str(url)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="velox-upload",
                                description="Upload a velox model folder to the Hugging Face Hub "
                                            "(creates the repo if needed; token from HF_TOKEN or login).")
    p.add_argument("path", help="velox model folder (written by velox-convert)")
    p.add_argument("repo", help="Hub repo id, user/name")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return upload_or_report(args.path, args.repo, private=args.private, prog="velox-upload")


def upload_or_report(folder: str | Path, repo_id: str, private: bool = False, prog: str = "velox-upload") -> int:
    """``upload`` for the CLIs: prints the URL, or the error and returns 1."""
    try:
        url = upload(folder, repo_id, private=private)
    except (VeloxFormatError, HfHubHTTPError, OSError) as e:
        print(f"{prog}: error: upload to {repo_id} failed: {e}", file=sys.stderr)
        return 1
    print(f"uploaded {folder} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
