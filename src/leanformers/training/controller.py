"""One controller protocol for the training-time methods (SST, CHTss) and one Trainer callback for all.

A *controller* owns a method's training-time state (SST's iteration counters and LR re-warm-up,
CHTss's masks) and acts after every optimizer step. It works in any loop::

    controller = SSTController(model)          # or CHTssController(model, optimizer, config, total_steps)
    controller.attach(optimizer, lr_scheduler)
    for batch in data:
        loss = model(**batch).loss; loss.backward()
        optimizer.step(); lr_scheduler.step()
        metrics = controller.step(optimizer)   # None, or a dict to log
        optimizer.zero_grad()
    controller.save(folder)                    # later: controller.resume(folder, global_step)

:class:`ControllerCallback` drives any controller inside ``transformers.Trainer``: it forwards the
Trainer's events, adds the controller's metrics to the Trainer's logs, writes its state into every
checkpoint and restores it on resume. A method's callback subclasses it with its specifics only.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from transformers import TrainerCallback

from leanformers.training.checkpoint import (
    STATE_DIRNAME,
    checkpoint_folder,
    load_state,
    resume_folder,
    save_state,
)
from leanformers.training.logs import MetricsFile, report_to_trackers

__all__ = ["Controller", "ControllerCallback"]


class Controller(ABC):
    """The protocol every training-time controller implements (SST's and CHTss's do).

    A method author writes ``attach``, ``step``, ``metrics``, ``remove`` and the two state hooks
    ``checkpoint_state`` / ``restore_state``; saving, loading and the resume policy come from here.

    Attributes:
        state_name: file stem of the state in a checkpoint: ``<folder>/leanformers/<state_name>.safetensors``.
        method_name: the method's name in messages (``"SST"``, ``"CHTss"``).
        global_step: optimizer steps done so far (Trainer ``state.global_step``).
    """

    state_name: ClassVar[str]
    method_name: ClassVar[str]
    global_step: int

    @abstractmethod
    def attach(self, optimizer: torch.optim.Optimizer, lr_scheduler=None) -> None:
        """Use ``optimizer`` from now on (checked; accelerate wrappers accepted). Idempotent."""

    @abstractmethod
    def step(
        self, optimizer=None, lr_scheduler=None, global_step: int | None = None
    ) -> dict[str, float] | None:
        """Call once after every optimizer step; returns metrics to log when the method acted, else None.

        Args:
            optimizer, lr_scheduler: attached when given (see :meth:`attach`).
            global_step: optimizer steps done including this one; default: count one more.
        """

    @abstractmethod
    def metrics(self) -> dict[str, float]:
        """A snapshot of the method's state for logging (``"<method>/<name>": value``)."""

    @abstractmethod
    def remove(self) -> None:
        """Detach every hook the controller put on the model or optimizer."""

    @abstractmethod
    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, meta)`` to checkpoint: named tensors and a JSON-able dict (no pickles)."""

    @abstractmethod
    def restore_state(
        self, tensors: dict[str, torch.Tensor], meta: dict, check_weights: bool = False
    ) -> None:
        """Restore what :meth:`checkpoint_state` returned.

        Args:
            check_weights: the model's weights come from the same checkpoint: raise when they disagree.
        """

    def save(self, folder: str | os.PathLike) -> Path | None:
        """Write the state into a (Trainer checkpoint) folder, atomically; main process only."""
        return save_state(folder, self.state_name, *self.checkpoint_state())

    def load(self, folder: str | os.PathLike, check_weights: bool = False) -> bool:
        """Restore what :meth:`save` wrote; False when the folder holds no such state."""
        loaded = load_state(folder, self.state_name)
        if loaded is None:
            return False
        self.restore_state(*loaded, check_weights=check_weights)
        return True

    def resume_without_state(self, folder: Path, global_step: int) -> None:
        """The resumed ``folder`` holds no state of this method: raise (a method may derive it instead)."""
        raise FileNotFoundError(
            f"the Trainer resumes from {folder} but it holds no {self.method_name} state "
            f"({STATE_DIRNAME}/{self.state_name}.safetensors): it cannot be recovered from the weights. Resume "
            f"from a complete checkpoint folder written by a run with {self.method_name}'s callback (copy it with "
            f"its {STATE_DIRNAME}/ subfolder), or start a fresh run."
        )

    def resume(self, folder: str | os.PathLike | None, global_step: int) -> None:
        """The one resume policy: restore the state saved in ``folder``, the folder training resumed from.

        ``folder`` is where the model weights were read from (``training.resume_folder`` under the
        Trainer), never a guess from ``output_dir``; None means a fresh run. The weights are checked
        against the state, and the state must be at ``global_step``.
        """
        if folder is None:
            return
        folder = Path(folder)
        if not self.load(folder, check_weights=True):
            self.resume_without_state(folder, global_step)
        if self.global_step != global_step:
            raise ValueError(
                f"{self.method_name} state in {folder} is at step {self.global_step} but training resumes at step "
                f"{global_step}: the state belongs to another checkpoint."
            )


class ControllerCallback(TrainerCallback):
    """Drive a :class:`Controller` inside ``transformers.Trainer``.

    - ``on_train_begin``: :meth:`build_controller` on the Trainer's model and optimizer, then
      :meth:`Controller.resume` from the folder the Trainer resumed from (wherever it lies);
    - ``step_event`` (``on_step_end``, after ``zero_grad``, or ``on_optimizer_step``, before it):
      :meth:`Controller.step` with the Trainer's optimizer step count (never micro-batches);
    - ``on_log``: the :meth:`loggable` part of the metrics of the last step that returned some is added
      to the Trainer's logs (the console, ``state.log_history``); all of them go to the ``report_to``
      trackers and, with ``metrics_file`` set, to ``output_dir/<metrics_file>`` (one JSON record per step
      that returned metrics, written at once);
    - ``on_save``: the controller's state into ``checkpoint-N/leanformers/<state_name>.safetensors``.
    """

    step_event: ClassVar[str] = "on_step_end"
    metrics_file: ClassVar[str | None] = None  # e.g. "chtss_metrics.json" in output_dir

    def __init__(self) -> None:
        self.controller: Controller | None = None
        self._pending_logs: dict[str, float] = {}
        self._pending_details: dict[str, float] = {}
        self._metrics_file: MetricsFile | None = None

    def build_controller(self, args, state, model, optimizer, resuming: bool) -> Controller:
        """The method's controller for this ``train()`` call (``resuming``: a checkpoint's state follows)."""
        raise NotImplementedError

    def loggable(self, metrics: dict[str, float]) -> dict[str, float]:
        """The part of a step's metrics that goes to the Trainer's logs and console (default: all)."""
        return metrics

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        folder = resume_folder(args, state)
        if self.controller is not None:  # a second train() call: drop the old hooks first
            self.controller.remove()
        self.controller = self.build_controller(args, state, model, optimizer, resuming=folder is not None)
        self.controller.resume(folder, state.global_step)
        if optimizer is not None:
            self.controller.attach(optimizer, lr_scheduler)
        if self.metrics_file and args.output_dir:
            self._metrics_file = MetricsFile(args.output_dir, self.metrics_file)
            self._metrics_file.start(state.global_step if folder is not None else None)
        return control

    def _step(self, global_step: int, optimizer, lr_scheduler) -> None:
        metrics = self.controller.step(optimizer, lr_scheduler, global_step=global_step)
        if metrics:
            self._pending_logs.update(self.loggable(metrics))
            self._pending_details.update(metrics)
            if self._metrics_file is not None:
                self._metrics_file.append(global_step, metrics)

    def on_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if self.step_event == "on_optimizer_step":  # the Trainer counts this step after the event
            self._step(state.global_step + 1, optimizer, lr_scheduler)
        return control

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if self.step_event == "on_step_end":
            self._step(state.global_step, optimizer, lr_scheduler)
        if self._pending_logs:
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self._pending_logs and logs is not None:
            logs.update(self._pending_logs)
            if state.log_history:
                state.log_history[-1].update(self._pending_logs)
            self._pending_logs = {}
        if self._pending_details:  # the trackers ran before this callback: they get every metric now
            details, self._pending_details = self._pending_details, {}
            report_to_trackers(details, args, state, control, model)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.save(checkpoint_folder(args, state))
        return control
