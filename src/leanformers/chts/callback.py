"""CHTssCallback: drives a :class:`CHTssController` inside ``transformers.Trainer`` (the work happens there)."""

from __future__ import annotations

from leanformers.chts.config import CHTssConfig
from leanformers.chts.controller import CHTssController, check_unsharded
from leanformers.chts.deprecated import warn_renamed
from leanformers.chts.metrics import console_metrics
from leanformers.training.controller import ControllerCallback
from leanformers.training.sharding import warn_if_fsdp2_ignored

__all__ = ["CHTssCallback"]


class CHTssCallback(ControllerCallback):
    """Dynamic sparse training inside ``transformers.Trainer`` (events: :class:`ControllerCallback`).

    Runs on one device, under DDP and under FSDP2 (masks and moments per shard, topology updates on
    gathered whole matrices: docs/scaling.md); refuses FSDP1 and DeepSpeed ZeRO. Steps at
    ``on_optimizer_step`` (before ``zero_grad``) with ``total_steps = state.max_steps``.

    Logs: the console gets ``chtss/density`` (sparse subset), ``chtss/removed``, ``chtss/regrown`` and
    ``chtss/update_ms`` after each update (and the ``"auto"`` update interval once); every metric,
    per layer included, goes to the ``report_to`` trackers and to ``output_dir/chtss_metrics.json``.

    Masks: in every checkpoint (resume), in any folder the model is saved to with ``save_pretrained`` /
    ``trainer.save_model``, and in ``output_dir/leanformers/chtss_masks.safetensors`` at the end.
    """

    step_event = "on_optimizer_step"
    metrics_file = "chtss_metrics.json"
    controller: CHTssController | None

    def __init__(self, config: CHTssConfig | None = None):
        super().__init__()
        self.config = config or CHTssConfig()
        self.config.validate()
        self._interval_logged = False

    @property
    def scheduler(self) -> CHTssController | None:
        """Deprecated name of :attr:`controller`."""
        warn_renamed("CHTssCallback.scheduler", "CHTssCallback.controller")
        return self.controller

    def on_init_end(self, args, state, control, model=None, **kwargs):
        check_unsharded(args=args, model=model)  # FSDP1 / DeepSpeed: refuse before any training
        return control

    def build_controller(self, args, state, model, optimizer, resuming: bool) -> CHTssController:
        if model is None or optimizer is None:
            raise ValueError("CHTssCallback needs the Trainer's model and optimizer in on_train_begin")
        check_unsharded(args=args, model=model, optimizer=optimizer)
        warn_if_fsdp2_ignored("CHTss", args, model)
        controller = CHTssController(model, optimizer, self.config, state.max_steps, init_masks=not resuming)
        controller.check_schedule()
        self._interval_logged = self.config.update_interval != "auto"
        return controller

    def loggable(self, metrics: dict[str, float]) -> dict[str, float]:
        shown = console_metrics(metrics)
        if not self._interval_logged and "chtss/update_interval" in metrics:
            shown["chtss/update_interval"] = metrics["chtss/update_interval"]
            self._interval_logged = True
        return shown

    def on_train_end(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.save_masks(args.output_dir)
        return control
