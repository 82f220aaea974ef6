"""Deprecated: ``leanformers.pifa.compress`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.compression.pipeline import resolve_layout  # noqa: E402
from leanformers.compression.precision import full_precision_matmul  # noqa: E402
from leanformers.compression.report import CompressionReport, ModuleReport  # noqa: E402
from leanformers.compressors.mpifa import MPIFAConfig, mpifa_compress  # noqa: E402
from leanformers.pifa import warn_moved

warn_moved(
    "leanformers.pifa.compress",
    "leanformers.compression.pipeline, leanformers.compression.precision, leanformers.compression.report, leanformers.compressors.mpifa",
)

__all__ = [
    "CompressionReport",
    "MPIFAConfig",
    "ModuleReport",
    "full_precision_matmul",
    "mpifa_compress",
    "resolve_layout",
]
