"""CHTs / CHTss: Cannistraci-Hebb soft-rule dynamic sparse training with sigmoid density decay."""

from leanformers.chts.callback import CHTssCallback
from leanformers.chts.config import DEFAULT_TARGETS, CHTssConfig
from leanformers.chts.masks import apply_masks, load_masks, save_masks
from leanformers.chts.scheduler import CHTssScheduler

__all__ = [
    "DEFAULT_TARGETS",
    "CHTssCallback",
    "CHTssConfig",
    "CHTssScheduler",
    "apply_masks",
    "load_masks",
    "save_masks",
]
