"""Deprecated: ``leanformers.pifa.plan`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.compressors.budget import RankPlan, owl_block_densities, plan_ranks, spectrum_scan  # noqa: E402
from leanformers.pifa import warn_moved

warn_moved("leanformers.pifa.plan", "leanformers.compressors.budget")

__all__ = ["RankPlan", "owl_block_densities", "plan_ranks", "spectrum_scan"]
