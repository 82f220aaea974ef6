"""CHTssCallback: drives a :class:`CHTssController` inside ``transformers.Trainer`` (the work happens there)."""

from __future__ import annotations

import logging

from leanformers.chts.config import CHTssConfig
from leanformers.chts.controller import CHTssController, check_unsharded
from leanformers.training.controller import ControllerCallback
from leanformers.training.distributed import sharded_training_backend
from leanformers.training.fsdp import is_fsdp2_model

logger = logging.getLogger(__name__)

__all__ = ["CHTssCallback"]


class CHTssCallback(ControllerCallback):
    """Dynamic sparse training inside ``transformers.Trainer`` (events: :class:`ControllerCallback`).

    Runs on one device, under DDP and under FSDP2 (masks and moments per shard, topology updates on
    gathered whole matrices: docs/scaling.md); refuses FSDP1 and DeepSpeed ZeRO. Steps at ``on_optimizer_step`` (before ``zero_grad``) with
    ``total_steps = state.max_steps``; logs no per-layer active-neuron fractions; at ``on_train_end``
    writes the final masks to ``output_dir/leanformers/chtss_masks.safetensors``.
    """

    step_event = "on_optimizer_step"
    controller: CHTssController | None

    def __init__(self, config: CHTssConfig | None = None):
        super().__init__()
        self.config = config or CHTssConfig()
        self.config.validate()

    @property
    def scheduler(self) -> CHTssController | None:
        """The controller (the name before the controller protocol)."""
        return self.controller

    def on_init_end(self, args, state, control, model=None, **kwargs):
        check_unsharded(args=args, model=model)  # FSDP1 / DeepSpeed: refuse before any training
        return control

    def build_controller(self, args, state, model, optimizer, resuming: bool) -> CHTssController:
        if model is None or optimizer is None:
            raise ValueError("CHTssCallback needs the Trainer's model and optimizer in on_train_begin")
        check_unsharded(args=args, model=model, optimizer=optimizer)
        if sharded_training_backend(args=args) == "FSDP2" and not is_fsdp2_model(model):
            # accelerate 1.x ignores an FSDP plugin on CPU (MULTI_CPU) and trains DDP instead.
            logger.warning(
                "FSDP2 was requested but the model's parameters are not sharded (accelerate ignores FSDP on "
                "CPU and uses DDP): CHTss runs its DDP path, every rank holds whole weights and masks."
            )
        controller = CHTssController(model, optimizer, self.config, state.max_steps, init_masks=not resuming)
        controller.check_schedule()
        return controller

    def loggable(self, metrics: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in metrics.items() if "/active_out/" not in k}

    def on_train_end(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.save_masks(args.output_dir)
        return control
