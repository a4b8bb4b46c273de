"""velox-serve: mlx_lm's OpenAI-compatible server with the folder's compressed KV caches.

Every ``mlx_lm.server`` flag passes through (``--model``, ``--port``, ``--prompt-cache-size``,
``--draft-model``, ...); velox adds ``--kv METHOD``. The hook is the one name the server
loads models through: ``mlx_lm.server`` calls its module-level ``load`` (imported from
``mlx_lm.utils``) for the model, for models a request names, and for the draft model.
Replacing that name with ``load_model`` sends loading through ``velox.load``, so the rest
of the server (prompt-cache trie, trim and extend, streaming) runs unchanged on
VeloxKVCache. VeloxKVCache has no ``merge``, so the server serves requests one at a time
(as it does for ``--kv-bits``); ``sharded_load`` (distributed serving) is not hooked.
"""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from typing import Any, Optional

from ..cpu import reexec_with_openblas


def load_model(path_or_repo: str, kv: Optional[str] = None, **kwargs) -> tuple[Any, ...]:
    """``mlx_lm.utils.load`` for the server: velox folders through ``velox.load`` (method ``kv``),
    other models (a plain draft model, say) through mlx_lm with their own caches."""
    from mlx_lm.utils import load as mlx_lm_load

    from ..format import VeloxFormatError
    from .loader import load, read_kv_quant, resolve_path

    folder = str(resolve_path(path_or_repo, kwargs.pop("revision", None)))  # downloaded once, for both paths
    try:
        read_kv_quant(folder)
    except VeloxFormatError as e:
        logging.warning(f"velox-serve: {path_or_repo}: {e}; serving it with mlx_lm's own caches")
        return mlx_lm_load(folder, **kwargs)
    loaded = load(folder, kv=kv, **kwargs)
    cache = loaded[0].make_cache()
    velox_layers = [c for c in cache if hasattr(c, "method")]
    logging.info(f"velox-serve: {path_or_repo}: {velox_layers[0].method if velox_layers else 'no'} KV caches "
                 f"on {len(velox_layers)} of {len(cache)} layers")
    return loaded


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        reexec_with_openblas()
        argv = sys.argv[1:]
    # velox's own flags first; the rest (and --help) goes to mlx_lm.server's parser.
    own = argparse.ArgumentParser(prog="velox-serve", add_help=False,
                                  description="mlx_lm.server with velox's compressed KV caches; velox's flag:")
    own.add_argument("--kv", default=None, help="calibrated method to use (default: the folder's default)")
    args, rest = own.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(own.format_help())
    from mlx_lm import server

    server.load = partial(load_model, kv=args.kv)
    sys.argv = ["velox-serve", *rest]  # mlx_lm.server.main parses sys.argv itself
    server.main()


if __name__ == "__main__":
    main()
