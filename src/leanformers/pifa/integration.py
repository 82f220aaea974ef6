"""Deprecated: ``leanformers.pifa.integration`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.pifa import warn_moved
from leanformers.storage.integration import (  # noqa: E402
    COMPRESSED_TYPES,
    compressed_modules,
    dense_skeleton,
    densify_modules,
    dequantize_model,
    replace_with_pifa_layers,
    resolve_module_names,
)

warn_moved("leanformers.pifa.integration", "leanformers.storage.integration")

__all__ = [
    "COMPRESSED_TYPES",
    "compressed_modules",
    "dense_skeleton",
    "densify_modules",
    "dequantize_model",
    "replace_with_pifa_layers",
    "resolve_module_names",
]
