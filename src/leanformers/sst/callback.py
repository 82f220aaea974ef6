"""``SSTCallback``: drives an :class:`SSTController` inside ``transformers.Trainer``.

Counters run on optimizer steps (Trainer ``global_step``), never on micro-batches, so gradient
accumulation changes nothing; see :class:`leanformers.training.ControllerCallback` for the events.
"""

from __future__ import annotations

import logging
import os

from leanformers.sst.controller import SSTController, check_backend, requested_fsdp_version
from leanformers.sst.model import exclude_sst_buffers_from_ddp, frozen_factors_as_parameters
from leanformers.sst.saving import set_trainer_checkpoints
from leanformers.training.controller import ControllerCallback
from leanformers.training.fsdp import is_fsdp2_model

logger = logging.getLogger(__name__)

__all__ = ["SSTCallback", "SSTController"]


class SSTCallback(ControllerCallback):
    """Forward Trainer events to an :class:`SSTController` (created at ``on_train_begin``).

    Round metrics (effective rank, orthogonality error, re-SVD time) are added to the next Trainer
    log; controller state goes into every checkpoint and is restored on resume. Between ``on_train_begin``
    and ``on_train_end`` every ``save_pretrained`` of the model writes the full (resumable) adapter state,
    whatever ``SSTConfig.save_format`` says: those are the Trainer's checkpoints. A ``trainer.save_model``
    after ``train()`` writes what ``save_format`` asks (compact for fine-tuning).
    """

    controller: SSTController | None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # The Trainer has already built its DDP settings from args.ddp_broadcast_buffers (in Trainer.__init__,
        # before on_init_end), so setting that flag here would change nothing; instead SST's buffers go on
        # DDP's ignore list of the model the Trainer will wrap (at train()).
        check_backend(args=args, model=model)  # DeepSpeed ZeRO / FSDP1: refuse before any training
        if model is not None:
            exclude_sst_buffers_from_ddp(model)
            if (
                requested_fsdp_version(args) == 2
            ):  # the Trainer applies fully_shard at train(): U, Vh sharded too
                frozen_factors_as_parameters(model)
        return control

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            set_trainer_checkpoints(model, True)
        return super().on_train_begin(args, state, control, model=model, **kwargs)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            set_trainer_checkpoints(model, False)
        return control

    def build_controller(self, args, state, model, optimizer, resuming: bool) -> SSTController:
        check_backend(args=args, model=model, optimizer=optimizer)
        fsdp_asked = (
            getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        )
        if fsdp_asked and model is not None and not is_fsdp2_model(model):
            # accelerate 1.x keeps DistributedType.MULTI_CPU on CPU and drops the FSDP plugin: DDP trains.
            logger.warning(
                "FSDP2 was requested but the model's parameters are not sharded (accelerate ignores FSDP on CPU "
                "and trains with DDP): SST runs its DDP path, every rank holds the whole model."
            )
        return SSTController(model)
