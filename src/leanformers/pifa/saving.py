"""Deprecated: ``leanformers.pifa.saving`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.pifa import warn_moved
from leanformers.storage.saving import PICKLE_SUFFIXES, check_safetensors_only, save_compressed  # noqa: E402

warn_moved("leanformers.pifa.saving", "leanformers.storage.saving")

__all__ = ["PICKLE_SUFFIXES", "check_safetensors_only", "save_compressed"]
