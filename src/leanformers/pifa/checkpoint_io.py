"""Deprecated: ``leanformers.pifa.checkpoint_io`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.compression.checkpoint_io import (  # noqa: E402
    CheckpointReader,
    PeakHostMemory,
    ShardWriter,
    materialize,
    release,
    release_host_memory,
)
from leanformers.pifa import warn_moved

warn_moved("leanformers.pifa.checkpoint_io", "leanformers.compression.checkpoint_io")

__all__ = [
    "CheckpointReader",
    "PeakHostMemory",
    "ShardWriter",
    "materialize",
    "release",
    "release_host_memory",
]
