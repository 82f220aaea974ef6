"""CHTssCallback: drives a :class:`CHTssController` inside ``transformers.Trainer`` (the work happens there)."""

from __future__ import annotations

from leanformers.chts.config import CHTssConfig
from leanformers.chts.controller import CHTssController, check_unsharded
from leanformers.training.controller import ControllerCallback

__all__ = ["CHTssCallback"]


class CHTssCallback(ControllerCallback):
    """Dynamic sparse training inside ``transformers.Trainer`` (events: :class:`ControllerCallback`).

    Refuses FSDP / DeepSpeed ZeRO (issue 12); steps at ``on_optimizer_step`` (before ``zero_grad``) with
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
        check_unsharded(args=args, model=model)  # FSDP / DeepSpeed: refuse before any training
        return control

    def build_controller(self, args, state, model, optimizer, resuming: bool) -> CHTssController:
        if model is None or optimizer is None:
            raise ValueError("CHTssCallback needs the Trainer's model and optimizer in on_train_begin")
        check_unsharded(args=args, model=model, optimizer=optimizer)
        controller = CHTssController(model, optimizer, self.config, state.max_steps, init_masks=not resuming)
        controller.check_schedule()
        return controller

    def loggable(self, metrics: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in metrics.items() if "/active_out/" not in k}

    def on_train_end(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.save_masks(args.output_dir)
        return control
