"""Deprecated: ``leanformers.pifa.streams`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.compression.streams import BlockStreams, block_errors  # noqa: E402
from leanformers.pifa import warn_moved

warn_moved("leanformers.pifa.streams", "leanformers.compression.streams")

__all__ = ["BlockStreams", "block_errors"]
