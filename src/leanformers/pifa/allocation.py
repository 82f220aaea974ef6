"""Deprecated: ``leanformers.pifa.allocation`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.compressors.allocation import (  # noqa: E402
    default_rank_multiple,
    module_ranks,
    outlier_ratio,
    owl_densities,
    solve_mlp_density,
    spectrum_bounds,
    spectrum_ranks,
    whitened_spectrum,
)
from leanformers.pifa import warn_moved

warn_moved("leanformers.pifa.allocation", "leanformers.compressors.allocation")

__all__ = [
    "default_rank_multiple",
    "module_ranks",
    "outlier_ratio",
    "owl_densities",
    "solve_mlp_density",
    "spectrum_bounds",
    "spectrum_ranks",
    "whitened_spectrum",
]
