"""What SST and CHTss share: optimizer-state surgery, LR re-warm-up, rank agreement, checkpoint state."""

from leanformers.training.checkpoint import checkpoint_folder, load_state, resume_folder, save_state
from leanformers.training.distributed import (
    all_reduce_mean_,
    broadcast_,
    broadcast_object,
    is_distributed,
    is_main_process,
    seeded_generator,
    sharded_training_backend,
    world_size,
)
from leanformers.training.lr import LRRewarmup
from leanformers.training.optim import (
    check_optimizer,
    mask_state_,
    reset_state,
    unwrap_optimizer,
)

__all__ = [
    "LRRewarmup",
    "all_reduce_mean_",
    "broadcast_",
    "broadcast_object",
    "check_optimizer",
    "checkpoint_folder",
    "is_distributed",
    "is_main_process",
    "load_state",
    "mask_state_",
    "reset_state",
    "resume_folder",
    "save_state",
    "seeded_generator",
    "sharded_training_backend",
    "unwrap_optimizer",
    "world_size",
]
