"""What SST and CHTss share: the controller protocol and its Trainer callback, optimizer-state surgery,
LR re-warm-up, rank agreement, the sharding policy, checkpoint state."""

from leanformers.training.checkpoint import checkpoint_folder, load_state, resume_folder, save_state
from leanformers.training.controller import Controller, ControllerCallback
from leanformers.training.distributed import (
    agree_with_rank0,
    all_reduce_mean_,
    broadcast_,
    is_distributed,
    is_main_process,
    seeded_generator,
    world_size,
)
from leanformers.training.lr import LRRewarmup
from leanformers.training.optim import (
    check_optimizer,
    mask_state_,
    reset_state,
    unwrap_optimizer,
)
from leanformers.training.sharding import (
    check_sharding,
    requested_fsdp_version,
    sharded_training_backend,
    unwrap_model,
)

__all__ = [
    "Controller",
    "ControllerCallback",
    "LRRewarmup",
    "agree_with_rank0",
    "all_reduce_mean_",
    "broadcast_",
    "check_optimizer",
    "check_sharding",
    "checkpoint_folder",
    "is_distributed",
    "is_main_process",
    "load_state",
    "mask_state_",
    "requested_fsdp_version",
    "reset_state",
    "resume_folder",
    "save_state",
    "seeded_generator",
    "sharded_training_backend",
    "unwrap_model",
    "unwrap_optimizer",
    "world_size",
]
