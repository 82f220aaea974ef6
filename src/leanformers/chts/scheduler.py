"""Deprecated module: :class:`CHTssController` lives in ``leanformers.chts.controller``."""

import warnings

from leanformers.chts.controller import CHTssController, check_unsharded
from leanformers.chts.deprecated import CHTssScheduler
from leanformers.chts.state import STATE_NAME

warnings.warn(
    "leanformers.chts.scheduler is deprecated: import CHTssController from leanformers.chts.",
    FutureWarning,
    stacklevel=2,
)

__all__ = ["STATE_NAME", "CHTssController", "CHTssScheduler", "check_unsharded"]
