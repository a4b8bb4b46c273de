"""velox.load: an mlx_lm model whose caches are the folder's compressed KV caches."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache
from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS
from mlx_lm.utils import load as mlx_lm_load

from ..cpu import float32_on_cpu
from ..format import ARTIFACT_FILE, VeloxFormatError, check_artifacts, read_safetensors_header, validate_kv_quant
from ..methods import METHODS, LayerSpec, get_method, outliers, ratequant
from ..methods.rope import PreRopeCodec, layer_rope
from . import attention
from .cache import ExactCodec, VeloxKVCache
from .layers import CacheLayout, cache_layout, native_caches, refuse

# mlx_lm's load_prompt_cache (and CacheList) look cache classes up by name in their own
# module: registered there, a velox prompt-cache file reads with plain mlx_lm too (caches
# without codecs, which say how to attach them) instead of failing with a KeyError.
setattr(mlx_cache, VeloxKVCache.__name__, VeloxKVCache)


def resolve_path(path_or_repo: str, revision: Optional[str] = None) -> Path:
    """A local folder as is; a Hub repo id downloaded with kv_quant.safetensors included."""
    path = Path(path_or_repo)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    patterns = DEFAULT_ALLOW_PATTERNS + [ARTIFACT_FILE, "README.md"]
    return Path(snapshot_download(str(path_or_repo), revision=revision, allow_patterns=patterns))


def supported_architectures() -> tuple[str, ...]:
    """Model types velox converts and runs (supported, or with data-free methods only), as
    scripts/architecture_sweep.py measured them (docs/ARCHITECTURES.md)."""
    matrix = json.loads((Path(__file__).parent.parent / "data" / "architectures.json").read_text())
    return tuple(r["model_type"] for r in matrix if r["status"] in ("supported", "data-free only"))


TESTED_ARCHITECTURES = supported_architectures()


def mlx_lm_model_types() -> list[str]:
    """The model types the installed mlx_lm can build: its model modules defining ModelArgs
    (read, not imported: importing ~100 modules only to list them is slow)."""
    import mlx_lm.models

    folder = Path(mlx_lm.models.__file__).parent
    return sorted(f.stem for f in folder.glob("*.py") if "class ModelArgs" in f.read_text())


def load_mlx_lm(path: str | Path, **kwargs) -> tuple[Any, ...]:
    """``mlx_lm.utils.load``, where an architecture mlx_lm cannot build is reported with the
    ones it can (velox compresses the plain-KVCache layers of any of them)."""
    try:
        return mlx_lm_load(str(path), **kwargs)
    except ValueError as e:
        if not str(e).startswith("Model type") or "not supported" not in str(e):
            raise
        raise ValueError(f"{e} velox runs on the architectures mlx_lm builds, compressing their attention layers "
                         f"that use a plain KVCache; this mlx_lm supports: {', '.join(mlx_lm_model_types())} "
                         f"(docs/ARCHITECTURES.md lists the {len(TESTED_ARCHITECTURES)} velox supports)") from None


def read_kv_quant(folder: Path) -> dict:
    """The raw kv_quant section of ``folder/config.json`` (not yet validated)."""
    config_path = Path(folder) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise VeloxFormatError(f"no config.json in {folder}") from None
    except json.JSONDecodeError as e:
        raise VeloxFormatError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or "kv_quant" not in config:
        raise VeloxFormatError(f"{config_path} has no kv_quant section: convert the model with velox-convert first")
    return config["kv_quant"]


def layer_specs(kvq: dict, method: str, model) -> list[Optional[LayerSpec]]:
    """One LayerSpec per layer for ``method`` (None where the native cache stays); a layer
    with per-head widths gets key_bits/value_bits 0 (its entry holds the lists)."""
    model_info = kvq.get("model", {})
    seed = int(kvq.get("calibration", {}).get("seed", 0))
    specs = []
    for entry in kvq["methods"][method]["layers"]:
        if entry.get("cache") == "native":
            specs.append(None)
            continue
        uniform = not isinstance(entry["key_bits"], list)
        specs.append(LayerSpec(layer=entry["layer"], num_kv_heads=int(model_info["num_kv_heads"]),
                               head_dim=int(model_info["head_dim"]), value_head_dim=model_info.get("value_head_dim"),
                               key_bits=entry["key_bits"] if uniform else 0,
                               value_bits=entry["value_bits"] if uniform else 0, seed=seed,
                               rope=layer_rope(model, entry["layer"])))
    return specs


def expected_tensors(kvq: dict) -> set[str]:
    """Every tensor name the artifact must hold: each method's ``TENSORS`` (plus the outlier
    channels' when it has them) for each coded layer, once per width on per-head layers."""
    names = set()
    for method, entry in kvq["methods"].items():
        module = get_method(method)
        parts = getattr(module, "TENSORS", ())  # data-free methods store nothing
        if entry.get("options", {}).get("outliers", 0):
            parts = parts + outliers.TENSORS
        for layer in entry["layers"]:
            if layer.get("cache") == "native":
                continue
            prefix = f"{method}.layers.{layer['layer']}."
            if isinstance(layer["key_bits"], list):
                widths = sorted(set(layer["key_bits"]) | set(layer["value_bits"]))
                names.update(f"{prefix}bits{b}.{p}" for b in widths for p in parts)
            else:
                names.update(prefix + p for p in parts)
    return names


def check_tensor_names(kvq: dict, names: set[str]) -> None:
    """The artifact holds exactly the tensors kv_quant implies: a missing one would fail later
    with less context, an unexpected one means the file is not what the section describes."""
    want = expected_tensors(kvq)
    for what, diff in (("unexpected", names - want), ("missing", want - names)):
        if diff:
            shown = ", ".join(sorted(diff)[:5]) + (f" (+{len(diff) - 5} more)" if len(diff) > 5 else "")
            raise VeloxFormatError(f"{ARTIFACT_FILE}: {what} tensors for this kv_quant section: {shown}")


def load_artifact(folder: Path) -> dict[str, mx.array]:
    """The artifact's tensors; its header is checked first because MLX's reader trusts it.

    Float tensors of every method are checked for NaN/Inf here, not only those of the
    method being loaded (``base.tensor`` checks those again with their expected dtype).
    """
    path = Path(folder) / ARTIFACT_FILE
    if not path.exists():
        return {}
    read_safetensors_header(path)
    tensors = mx.load(str(path))
    for name, t in sorted(tensors.items()):
        if mx.issubdtype(t.dtype, mx.floating) and not mx.all(mx.isfinite(t)).item():
            raise VeloxFormatError(f"{ARTIFACT_FILE}: tensor {name!r} holds NaN or Inf")
    return tensors


def check_bits(module, method: str, entry: dict) -> None:
    """A layer's widths are ones the method implements (validate_kv_quant only bounds them)."""
    for kind, allowed in (("key_bits", module.SUPPORTED_KEY_BITS), ("value_bits", module.SUPPORTED_VALUE_BITS)):
        widths = entry[kind] if isinstance(entry[kind], list) else [entry[kind]]
        if not set(widths) <= set(allowed):
            raise VeloxFormatError(f"kv_quant: methods.{method}.layers[{entry['layer']}].{kind} {entry[kind]} "
                                   f"is not supported by {method} (choose from {list(allowed)})")


def build_codecs(kvq: dict, method: str, tensors: dict[str, mx.array], model) -> list[Optional[tuple]]:
    """(key codec, value codec) per layer, from the folder's artifact tensors."""
    module = get_method(method)
    n_outliers = kvq["methods"][method].get("options", {}).get("outliers", 0)
    codecs = []
    for spec, entry in zip(layer_specs(kvq, method, model), kvq["methods"][method]["layers"]):
        if spec is None:
            codecs.append(None)
            continue
        check_bits(module, method, entry)
        prefix = f"{method}.layers.{spec.layer}."
        mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            if n_outliers:
                outliers.check(method, n_outliers, spec.head_dim)  # its ValueError is wrapped below
                inner = lambda d: module.make_codecs(mine, replace(spec, head_dim=d))[0]
                codecs.append((outliers.key_codec(mine, spec, n_outliers, inner), module.make_codecs(mine, spec)[1]))
            elif spec.key_bits:
                codecs.append(module.make_codecs(mine, spec))
            else:
                codecs.append(ratequant.make_mixed_codecs(module, mine, spec, entry["key_bits"], entry["value_bits"]))
        except KeyError as e:
            raise VeloxFormatError(f"{ARTIFACT_FILE}: missing tensor {prefix}{e.args[0]}") from None
        except ValueError as e:  # VeloxFormatError, or MLX refusing shapes the checks let through
            raise VeloxFormatError(f"{method} layer {spec.layer}: {e}") from None
    return codecs


def check_kv_shapes(kvq: dict, method: str, layout: CacheLayout) -> None:
    """Each coded layer must really have kv_quant's KV heads and head_dim. Checked before any
    codec is built, so absurd declared sizes never allocate, and a smaller head count cannot
    broadcast silently."""
    H, D = kvq["model"]["num_kv_heads"], kvq["model"]["head_dim"]
    Dv = kvq["model"].get("value_head_dim", D)
    for entry in kvq["methods"][method]["layers"]:
        if entry.get("cache") != "native" and layout.coded[entry["layer"]]:
            if (layout.num_kv_heads, layout.head_dim) != (H, D):
                raise VeloxFormatError(f"kv_quant: model gives num_kv_heads={H}, head_dim={D} but layer "
                                       f"{entry['layer']} has {layout.num_kv_heads} KV heads of {layout.head_dim}")
            if layout.value_head_dim != Dv:
                raise VeloxFormatError(f"kv_quant: model gives value_head_dim={Dv} but layer {entry['layer']} "
                                       f"has values of {layout.value_head_dim}")


SELF_CHECK_PREFILL = (1, 2, 3, 4)  # token ids of the self-check: a 4-token prefill, then decode steps
SELF_CHECK_STEPS = (5, 6, 7)
# Relative logit error allowed (a) between velox caches with exact codecs and the model's own
# (float noise, fp16 sink/window), (b) between the fast path and the decode path on the same
# codes beyond the codes' own error (a rounding that flips between the two paths).
SELF_CHECK_EXACT = 1e-2
SELF_CHECK_FAST = 2e-2


def self_check_logits(model, caches: list) -> mx.array:
    """Logits [steps + 1, vocab] of the self-check prompt: the prefill's last, then each step's."""
    out = [model(mx.array([SELF_CHECK_PREFILL]), cache=caches)[:, -1]]
    out += [model(mx.array([[t]]), cache=caches)[:, -1] for t in SELF_CHECK_STEPS]
    return mx.concatenate(out).astype(mx.float32)


def self_check(model, method: str, make_cache: Callable[[bool, bool], list], fast: bool) -> None:
    """Refuse caches that do not honour the model's attention (a model type whose layers use
    their cache in a way velox did not expect), by logits after a prefill and decode steps.

    make_cache(fast, exact): velox's caches with the fast path or not, the real codecs or
    exact ones. Three checks: exact codecs reproduce the model's own caches; the real codecs
    run and give finite logits; with ``fast``, the fast path agrees with the decode path on
    the same codes (within the codes' own error against the model's caches, which it cannot
    exceed).
    """
    rel = lambda a, b: (mx.linalg.norm(a - b) / (mx.linalg.norm(b) + 1e-30)).item()
    ref = self_check_logits(model, native_caches(model))
    err = rel(self_check_logits(model, make_cache(False, True)), ref)
    if not err <= SELF_CHECK_EXACT:
        raise refuse(model, f"velox's caches with exact codecs give logits {err:.2g} off the model's own caches "
                            "(its layers use their KV cache, or rotate their keys, in a way velox's caches do not reproduce)")
    try:
        slow = self_check_logits(model, make_cache(False, False))
    except ValueError as e:
        raise VeloxFormatError(f"{method}: the folder's codecs do not run on this model: {e}") from None
    if not mx.all(mx.isfinite(slow)).item():
        raise VeloxFormatError(f"{method}: the folder's codecs give NaN/Inf logits on this model")
    caches = make_cache(True, False) if fast else []
    if any(getattr(c, "fast", False) for c in caches):
        err, codes = rel(self_check_logits(model, caches), slow), rel(slow, ref)
        if not err <= max(SELF_CHECK_FAST, codes):
            raise refuse(model, f"{method}'s attention from the codes gives logits {err:.2g} off its decoded cache's "
                                f"(the codes themselves: {codes:.2g} off exact); load it with fast=False")


def exact_codec(key_codec: Any) -> Any:
    """An exact codec in ``key_codec``'s frame: keys coded before RoPE go through the layer's
    RoPE inverse and back, so the self-check tests that inverse on this model too."""
    inner = key_codec.groups[0][1] if isinstance(key_codec, ratequant.HeadGroupCodec) else key_codec
    return PreRopeCodec(ExactCodec(), inner.rope) if isinstance(inner, PreRopeCodec) else ExactCodec()


def cache_factory(model, folder: Path, kvq: dict, method: Optional[str] = None,
                  fast: bool = True) -> tuple[str, Callable[[], list]]:
    """Check the folder's ``method`` against ``model`` and build its caches -> (method, a
    factory of one fresh cache per layer: VeloxKVCache where velox codes the layer, the
    model's own cache elsewhere).

    fast: caches whose codecs allow it attend from their codes (``velox.kernels``) in the
    layers whose attention reaches velox's dispatcher (``CacheLayout.attends_from_cache``).
    The caches are checked on a short prompt against the model's own (``self_check``).
    """
    method = method or kvq["default_method"]
    if method not in kvq["methods"]:
        raise ValueError(f"method {method!r} was not calibrated into this folder; it has: "
                         f"{', '.join(kvq['methods'])}")
    check_artifacts(folder, kvq)
    tensors = load_artifact(folder)
    check_tensor_names(kvq, set(tensors))
    # Keep the model's own factory across repeated installs (another method, another folder).
    if not hasattr(model, "_velox_native_make_cache"):
        model._velox_native_make_cache = getattr(model, "make_cache", None)
    layout = cache_layout(model)
    check_kv_shapes(kvq, method, layout)
    codecs = build_codecs(kvq, method, tensors, model)
    entry = kvq["methods"][method]
    fp16 = {"sink": int(entry.get("sink", 0)), "window": int(entry.get("window", 0))}

    def caches(fast: bool, exact: bool = False) -> list[Any]:
        native = native_caches(model)
        return [VeloxKVCache(*((exact_codec(c[0]), ExactCodec()) if exact else c), method=method,
                             fast=fast and layout.attends_from_cache[i], **fp16)
                if c is not None and layout.coded[i] else n
                for i, (c, n) in enumerate(zip(codecs, native))]

    with attention.installed():
        self_check(model, method, caches, fast)
    return method, lambda: caches(fast)


def install_kv_caches(model, folder: Path, kvq: dict, method: Optional[str] = None, fast: bool = True) -> str:
    """Replace ``model.make_cache`` with ``cache_factory``'s and install the attention
    dispatcher that routes attention to the fast caches. Returns the method."""
    method, make_cache = cache_factory(model, folder, kvq, method, fast)
    attention.install()
    model.make_cache = make_cache
    return method


def load(path_or_repo: str, kv: Optional[str] = None, revision: Optional[str] = None,
         fast: bool = True, **kwargs) -> tuple[Any, ...]:
    """Load a velox folder (or Hub repo) -> (model, tokenizer) with compressed KV caches.

    kv: which calibrated method to use (default: the folder's default_method).
    fast: attention from the codes where the method allows it (else decode the cache every step).
    Other keyword arguments go to ``mlx_lm.load`` (``return_config=True`` adds the config
    as a third item, as there). On MLX's CPU backend the model
    computes in float32 (bf16 there is slow and visibly worse).
    """
    folder = resolve_path(path_or_repo, revision)
    kvq = read_kv_quant(folder)
    model, tokenizer, *config = load_mlx_lm(folder, **kwargs)  # config: with return_config=True
    float32_on_cpu(model)
    validate_kv_quant(kvq, len(model.layers), set(METHODS))
    install_kv_caches(model, folder, kvq, kv, fast=fast)
    return (model, tokenizer, *config)


def load_prompt_cache(path: str | Path, model, return_metadata: bool = False):
    """Read a prompt-cache file written by mlx_lm's ``save_prompt_cache`` for ``model``.

    mlx_lm rebuilds each cache from its state alone, but a VeloxKVCache also needs its
    codecs (rotations, codebooks), which are not arrays and live in the model folder. So
    the file's states go into fresh caches from ``model.make_cache()`` (the folder's
    codecs), after checking that the file was written with the same method and fp16
    regions; other layers keep the caches mlx_lm read.
    """
    loaded, metadata = mlx_cache.load_prompt_cache(str(path), return_metadata=True)
    fresh = model.make_cache()
    if len(loaded) != len(fresh):
        raise ValueError(f"{path}: {len(loaded)} layer caches, the model has {len(fresh)}")
    cache = []
    for i, (got, mine) in enumerate(zip(loaded, fresh)):
        if type(got) is not type(mine):
            raise ValueError(f"{path}: layer {i} holds a {type(got).__name__}, the model makes a {type(mine).__name__}")
        if isinstance(mine, VeloxKVCache):
            if (got.method, got.sink, got.window) != (mine.method, mine.sink, mine.window):
                raise ValueError(f"{path}: layer {i} was written by {got.method} (sink {got.sink}, window "
                                 f"{got.window}), the model uses {mine.method} (sink {mine.sink}, window {mine.window})")
            mine.state = got.state
            got = mine
        cache.append(got)
    return (cache, metadata) if return_metadata else cache


def cache_bytes(cache: list[Any]) -> int:
    """Bytes held by a prompt cache's arrays."""
    return sum(c.nbytes for c in cache)
