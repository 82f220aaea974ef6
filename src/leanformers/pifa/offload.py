"""Deprecated: ``leanformers.pifa.offload`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.compression.offload import DiskStore, HostStore, OffloadedStreams, make_streams  # noqa: E402
from leanformers.pifa import warn_moved

warn_moved("leanformers.pifa.offload", "leanformers.compression.offload")

__all__ = ["DiskStore", "HostStore", "OffloadedStreams", "make_streams"]
