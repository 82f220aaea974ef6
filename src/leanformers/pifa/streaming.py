"""Deprecated: ``leanformers.pifa.streaming`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.compression.pretrained import resolve_dtype  # noqa: E402
from leanformers.compressors.mpifa import mpifa_compress_pretrained  # noqa: E402
from leanformers.pifa import warn_moved

warn_moved("leanformers.pifa.streaming", "leanformers.compression.pretrained, leanformers.compressors.mpifa")

__all__ = ["mpifa_compress_pretrained", "resolve_dtype"]
