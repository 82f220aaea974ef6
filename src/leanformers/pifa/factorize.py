"""Deprecated: ``leanformers.pifa.factorize`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.pifa import warn_moved
from leanformers.storage.factorize import (  # noqa: E402
    FORMS,
    PIFAFactors,
    normalize_form,
    pifa_from_factors,
    pifa_from_weight,
    pifa_to_dense,
    pivot_indices,
)

warn_moved("leanformers.pifa.factorize", "leanformers.storage.factorize")

__all__ = [
    "FORMS",
    "PIFAFactors",
    "normalize_form",
    "pifa_from_factors",
    "pifa_from_weight",
    "pifa_to_dense",
    "pivot_indices",
]
