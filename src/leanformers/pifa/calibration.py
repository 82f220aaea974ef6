"""Deprecated: ``leanformers.pifa.calibration`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.compression.layout import (  # noqa: E402
    ARCHITECTURES,
    BlockLayout,
    find_blocks,
    find_layout,
    infer_layout,
    linear_weight,
    refuse_compressed,
)
from leanformers.compression.replay import BlockCall, capture_block_inputs, run_block, run_block_capturing  # noqa: E402
from leanformers.pifa import warn_moved

warn_moved("leanformers.pifa.calibration", "leanformers.compression.layout, leanformers.compression.replay")

__all__ = [
    "ARCHITECTURES",
    "BlockCall",
    "BlockLayout",
    "capture_block_inputs",
    "find_blocks",
    "find_layout",
    "infer_layout",
    "linear_weight",
    "refuse_compressed",
    "run_block",
    "run_block_capturing",
]
