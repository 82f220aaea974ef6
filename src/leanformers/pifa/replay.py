"""Deprecated: ``leanformers.pifa.replay`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.compression.memo import ReplayMemo  # noqa: E402
from leanformers.pifa import warn_moved

warn_moved("leanformers.pifa.replay", "leanformers.compression.memo")

__all__ = ["ReplayMemo"]
