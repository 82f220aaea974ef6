"""Deprecated: ``leanformers.pifa.rank`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.pifa import warn_moved
from leanformers.storage.rank import lowrank_num_params, lowrank_rank, pifa_num_params, pifa_rank  # noqa: E402

warn_moved("leanformers.pifa.rank", "leanformers.storage.rank")

__all__ = ["lowrank_num_params", "lowrank_rank", "pifa_num_params", "pifa_rank"]
