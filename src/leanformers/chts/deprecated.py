"""Old names of the CHTss API, kept importable for a while; each warns (FutureWarning) when used."""

from __future__ import annotations

import warnings

from leanformers.chts.controller import CHTssController
from leanformers.chts.rewiring import Rewiring

__all__ = ["CHTssScheduler"]


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} is deprecated: use {new} (same behaviour).", FutureWarning, stacklevel=stacklevel)


class CHTssScheduler(CHTssController):
    """Deprecated name of :class:`CHTssController` (before the controller protocol); warns when built.

    Also keeps the former ``attach_optimizer`` and ``step_count`` names (now ``attach`` and ``global_step``)
    and ``_regrowth_batches`` (bench/chtss_train.py times it; now ``Rewiring.scored_batches``).
    """

    def __init__(self, *args, **kwargs):
        warn_renamed("leanformers.chts.CHTssScheduler", "leanformers.chts.CHTssController")
        super().__init__(*args, **kwargs)

    def attach_optimizer(self, optimizer, lr_scheduler=None) -> None:
        warn_renamed("CHTssScheduler.attach_optimizer", "CHTssController.attach")
        self.attach(optimizer, lr_scheduler)

    @property
    def step_count(self) -> int:
        warn_renamed("CHTssScheduler.step_count", "CHTssController.global_step")
        return self.global_step

    def _regrowth_batches(self, kept, timer):
        return Rewiring(self.layers, self.config, self.gradients).scored_batches(kept, timer)
