"""Deprecated: ``leanformers.pifa.layer`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.pifa import warn_moved
from leanformers.storage.base import CompressedLinear  # noqa: E402
from leanformers.storage.coefficients import (  # noqa: E402
    AUTO_COEFFICIENT_DTYPE,
    COEFFICIENT_DTYPES,
    coefficient_storage_dtype,
)
from leanformers.storage.layers import module_from_spec  # noqa: E402
from leanformers.storage.lowrank_linear import LowRankLinear  # noqa: E402
from leanformers.storage.pifa_linear import PIFALinear, auto_form, emit_in_order_, set_coefficient_dtype_  # noqa: E402

warn_moved(
    "leanformers.pifa.layer",
    "leanformers.storage.base, leanformers.storage.coefficients, leanformers.storage.layers, leanformers.storage.lowrank_linear, leanformers.storage.pifa_linear",
)

__all__ = [
    "AUTO_COEFFICIENT_DTYPE",
    "COEFFICIENT_DTYPES",
    "CompressedLinear",
    "LowRankLinear",
    "PIFALinear",
    "auto_form",
    "coefficient_storage_dtype",
    "emit_in_order_",
    "module_from_spec",
    "set_coefficient_dtype_",
]
