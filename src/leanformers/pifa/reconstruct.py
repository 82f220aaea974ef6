"""Deprecated: ``leanformers.pifa.reconstruct`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.compressors.reconstruct import (  # noqa: E402
    GramStats,
    alternating_steps,
    cholesky_with_damping,
    reconstruct,
    shrink_stats,
    svd_init,
    top_singular_triplets,
    whitened_svd_init,
)
from leanformers.pifa import warn_moved

warn_moved("leanformers.pifa.reconstruct", "leanformers.compressors.reconstruct")

__all__ = [
    "GramStats",
    "alternating_steps",
    "cholesky_with_damping",
    "reconstruct",
    "shrink_stats",
    "svd_init",
    "top_singular_triplets",
    "whitened_svd_init",
]
