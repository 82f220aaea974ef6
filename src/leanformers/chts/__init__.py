"""CHTs / CHTss: Cannistraci-Hebb soft-rule dynamic sparse training with sigmoid density decay."""

from leanformers.chts.callback import CHTssCallback
from leanformers.chts.config import DEFAULT_TARGETS, CHTssConfig
from leanformers.chts.controller import CHTssController
from leanformers.chts.deprecated import CHTssScheduler  # noqa: F401  (deprecated name; warns when used)
from leanformers.chts.masks import apply_masks, load_masks, save_masks

__all__ = [
    "DEFAULT_TARGETS",
    "CHTssCallback",
    "CHTssConfig",
    "CHTssController",
    "apply_masks",
    "load_masks",
    "save_masks",
]
