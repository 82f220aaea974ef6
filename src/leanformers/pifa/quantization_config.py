"""Deprecated: ``leanformers.pifa.quantization_config`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.pifa import warn_moved
from leanformers.storage.quantization_config import QUANT_METHOD, REQUIRES, MPIFAQuantizationConfig  # noqa: E402

warn_moved("leanformers.pifa.quantization_config", "leanformers.storage.quantization_config")

__all__ = ["MPIFAQuantizationConfig", "QUANT_METHOD", "REQUIRES"]
