"""Deprecated: ``leanformers.pifa.report`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.compression.report import CompressionReport, ModuleReport, module_path  # noqa: E402
from leanformers.pifa import warn_moved

warn_moved("leanformers.pifa.report", "leanformers.compression.report")

__all__ = ["CompressionReport", "ModuleReport", "module_path"]
