"""velox: calibrated KV-cache quantization for MLX (offline converter + runtime)."""

__version__ = "0.1.0"

from .runtime.loader import load  # noqa: E402

__all__ = ["load", "__version__"]
