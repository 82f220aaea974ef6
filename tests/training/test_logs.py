"""Where controller metrics go (training/logs.py): a few on the console, all to the trackers and a JSON."""

from __future__ import annotations

import json

import pytest
from transformers import Trainer, TrainerCallback, TrainingArguments

from leanformers.chts import CHTssCallback, CHTssConfig
from leanformers.chts.metrics import CONSOLE_KEYS
from leanformers.training.logs import TRACKER_CALLBACKS, MetricsFile
from tests.helpers import SeededTokens
from tests.tiny_models import tiny_llama


class MemoryTracker(TrainerCallback):
    """A user's own tracker: every ``on_log`` call it gets, by step."""

    def __init__(self):
        self.logged: dict[int, dict] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.setdefault(state.global_step, {}).update(logs or {})


@pytest.fixture()
def tracker():
    TRACKER_CALLBACKS.append(MemoryTracker)
    yield MemoryTracker()
    TRACKER_CALLBACKS.remove(MemoryTracker)


def _run(tmp_path, tracker, max_steps=8, resume=None, save_steps=10_000):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        logging_steps=2,
        save_strategy="steps",
        save_steps=save_steps,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    chtss = CHTssCallback(CHTssConfig(final_density=0.3, update_interval=2, topology_end=1.0))
    # the tracker first, as report_to places its integrations before the user's callbacks
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=SeededTokens(), callbacks=[tracker, chtss])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, chtss


def test_console_gets_the_summary_trackers_and_json_get_every_metric(tmp_path, tracker):
    trainer, chtss = _run(tmp_path, tracker)
    layers = [f"chtss/density/{layer.name}" for layer in chtss.controller.layers]
    for step in (2, 4, 6, 8):
        console = next(h for h in trainer.state.log_history if h["step"] == step and "loss" in h)
        assert {k for k in console if k.startswith("chtss/")} == set(CONSOLE_KEYS)
        assert set(layers) <= set(tracker.logged[step])  # per layer: the trackers
        assert tracker.logged[step]["chtss/density"] == console["chtss/density"]
    records = json.loads((tmp_path / "chtss_metrics.json").read_text())
    assert [r["step"] for r in records] == [2, 4, 6, 8] and set(layers) <= set(records[0])


def test_the_json_of_a_resumed_run_keeps_the_records_up_to_its_checkpoint(tmp_path, tracker):
    _run(tmp_path, tracker, save_steps=4)
    _run(tmp_path, tracker, resume=str(tmp_path / "checkpoint-4"), save_steps=4)
    records = json.loads((tmp_path / "chtss_metrics.json").read_text())
    assert [r["step"] for r in records] == [2, 4, 6, 8]  # 2, 4 from the first run; 6, 8 after the resume
    fresh = MetricsFile(tmp_path, "chtss_metrics.json")
    fresh.start(None)  # a fresh run starts an empty file
    assert json.loads((tmp_path / "chtss_metrics.json").read_text()) == []
