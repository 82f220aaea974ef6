"""Deprecated: ``leanformers.pifa.group`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.compression.pipeline import check_weights_finite  # noqa: E402
from leanformers.compression.precision import single_threaded_linalg  # noqa: E402
from leanformers.compressors.lowrank import chain_consumer  # noqa: E402
from leanformers.pifa import warn_moved

warn_moved(
    "leanformers.pifa.group",
    "leanformers.compression.pipeline, leanformers.compression.precision, leanformers.compressors.lowrank",
)

__all__ = ["chain_consumer", "check_weights_finite", "single_threaded_linalg"]
