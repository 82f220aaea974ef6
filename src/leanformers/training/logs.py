"""Where a controller's per-step metrics go besides the console: the ``report_to`` trackers and a JSON file.

The Trainer console prints every key of a log, so a method keeps its console entries few (see
``ControllerCallback.loggable``); its full metrics (e.g. one density per layer) go to

- the reporting integrations the Trainer runs for ``report_to`` (TensorBoard, W&B, MLflow, ...),
  called once more for the same step with the full metrics (:func:`report_to_trackers`), and your
  own tracker callbacks registered in :data:`TRACKER_CALLBACKS`;
- ``output_dir/<file>``: a JSON list of ``{"step": N, ...metrics}`` records, rewritten atomically by
  the main process; a resumed run keeps the records up to its checkpoint (:class:`MetricsFile`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from leanformers.training.distributed import is_main_process

__all__ = ["TRACKER_CALLBACKS", "MetricsFile", "report_to_trackers", "running_trainer"]

# Trainer callback classes that receive every controller metric, besides transformers' report_to
# integrations (``transformers.integrations``): append your own tracker's callback class here.
TRACKER_CALLBACKS: list[type] = []


def running_trainer():
    """The ``transformers.Trainer`` whose method is on the call stack (e.g. inside a callback), or None."""
    trainer_module = sys.modules.get("transformers.trainer")
    if trainer_module is None:  # not imported: no Trainer can be running
        return None
    frame = sys._getframe(1)
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, trainer_module.Trainer):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame


def _is_tracker(callback) -> bool:
    # report_to adds exactly the callbacks of transformers.integrations (TensorBoardCallback, WandbCallback, ...)
    if type(callback).__module__.startswith("transformers.integrations"):
        return True
    return bool(TRACKER_CALLBACKS) and isinstance(callback, tuple(TRACKER_CALLBACKS))


def report_to_trackers(metrics: dict[str, float], args, state, control, model=None) -> int:
    """Hand ``metrics`` to the running Trainer's ``report_to`` integrations for ``state.global_step``.

    Returns how many integrations got them (0 outside a Trainer, or with ``report_to="none"``).
    """
    trainer = running_trainer()
    if trainer is None or not metrics:
        return 0
    trackers = [cb for cb in trainer.callback_handler.callbacks if _is_tracker(cb)]
    for tracker in trackers:
        tracker.on_log(args, state, control, logs=dict(metrics), model=model)
    return len(trackers)


class MetricsFile:
    """``folder/name``: every record a run logged, as one JSON list (main process only).

    Args:
        folder: the run's ``output_dir``.
        name: file name, e.g. ``chtss_metrics.json``.
    """

    def __init__(self, folder: str | os.PathLike, name: str):
        self.path = Path(folder) / name
        self.records: list[dict] = []

    def start(self, resumed_step: int | None) -> None:
        """A fresh run starts an empty file; a resumed one keeps the records up to ``resumed_step``."""
        self.records = []
        if resumed_step is not None and self.path.is_file():
            try:
                old = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.path} is not valid JSON ({exc}): move it away to resume") from exc
            self.records = [r for r in old if int(r.get("step", 0)) <= resumed_step]
        self._write()

    def append(self, step: int, metrics: dict[str, float]) -> None:
        self.records.append({"step": int(step), **metrics})
        self._write()

    def _write(self) -> None:
        if not is_main_process():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.records, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)
