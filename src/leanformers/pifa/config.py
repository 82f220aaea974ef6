"""Deprecated: ``leanformers.pifa.config`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.compressors.mpifa import MPIFAConfig  # noqa: E402
from leanformers.pifa import warn_moved

warn_moved("leanformers.pifa.config", "leanformers.compressors.mpifa")

__all__ = ["MPIFAConfig"]
