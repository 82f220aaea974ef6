"""CHTssCallback: forwards HF Trainer events to a :class:`CHTssScheduler` (the work happens there)."""

from __future__ import annotations

from transformers import TrainerCallback

from leanformers.chts.config import CHTssConfig
from leanformers.chts.scheduler import STATE_NAME, CHTssScheduler, check_unsharded
from leanformers.training import checkpoint_folder, load_state, resume_folder, save_state

__all__ = ["CHTssCallback"]


class CHTssCallback(TrainerCallback):
    """Dynamic sparse training inside ``transformers.Trainer``.

    - ``on_init_end`` / ``on_train_begin``: refuse FSDP and DeepSpeed ZeRO (issue 12), whose sharded
      weights and fp32 master copies the masks would not reach.
    - ``on_train_begin``: builds the scheduler on the Trainer's model and optimizer with
      ``total_steps = state.max_steps``; on resume, loads the masks and counters from the folder the
      Trainer resumed from (wherever it lies) and re-applies them before the first forward. A resumed
      folder without CHTss state, or with masks that do not fit the resumed weights, is an error.
    - ``on_optimizer_step`` (after ``optimizer.step()``, before ``zero_grad``): re-masks weights and
      moments, rewires every ``update_interval`` steps.
    - ``on_save``: masks + scheduler state into ``checkpoint-N/leanformers/chtss.safetensors``.
    - ``on_log``: the last update's metrics are added to the Trainer's logs (``chtss/...``).
    - ``on_train_end``: masks of the final model to ``output_dir/leanformers/chtss_masks.safetensors``.

    Metrics reach ``state.log_history`` and the loggers that run after this callback; pass it first
    in ``callbacks`` of integrations you add yourself to have them everywhere.
    """

    def __init__(self, config: CHTssConfig | None = None):
        self.config = config or CHTssConfig()
        self.config.validate()
        self.scheduler: CHTssScheduler | None = None
        self._pending: dict[str, float] = {}

    def on_init_end(self, args, state, control, model=None, **kwargs):
        check_unsharded(args=args, model=model)  # FSDP / DeepSpeed: refuse before any training
        return control

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise ValueError("CHTssCallback needs the Trainer's model and optimizer in on_train_begin")
        check_unsharded(args=args, model=model, optimizer=optimizer)
        folder = resume_folder(args, state)
        if self.scheduler is not None:  # a second train() call: drop the old hooks first
            self.scheduler.remove()
        self.scheduler = CHTssScheduler(
            model, optimizer, self.config, total_steps=state.max_steps, init_masks=folder is None
        )
        self.scheduler.check_schedule()
        if folder is not None:
            loaded = load_state(folder, STATE_NAME)
            if loaded is None:
                raise FileNotFoundError(
                    f"the Trainer resumes from {folder} but it holds no CHTss state "
                    f"(leanformers/{STATE_NAME}.safetensors): the masks cannot be recovered from the weights. "
                    "Resume from a complete checkpoint folder written by a run with CHTssCallback (copy it with "
                    "its leanformers/ subfolder), or start a fresh run."
                )
            self.scheduler.load_state_dict(*loaded, check_weights=True)
            if self.scheduler.step_count != state.global_step:
                raise ValueError(
                    f"CHTss state in {folder} is at step {self.scheduler.step_count} but the Trainer resumes at "
                    f"step {state.global_step}: the masks belong to another checkpoint."
                )
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        metrics = self.scheduler.step()
        if metrics:
            self._pending = {k: v for k, v in metrics.items() if "/active_out/" not in k}
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending:
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            logs.update(self._pending)
            if state.log_history:
                state.log_history[-1].update(self._pending)
            self._pending = {}
        return control

    def on_save(self, args, state, control, **kwargs):
        tensors, meta = self.scheduler.state_dict()
        save_state(checkpoint_folder(args, state), STATE_NAME, tensors, meta)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.scheduler is not None:
            self.scheduler.save_masks(args.output_dir)
        return control
