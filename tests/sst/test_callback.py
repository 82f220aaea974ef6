"""SSTController / SSTCallback under HF Trainer: invariants over >= 2 rounds, optimizer state, resume."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from leanformers.sst import SSTCallback, SSTConfig, SSTController, SSTLinear
from tests.helpers import RandomTokens, cpu_training_args
from tests.tiny_models import random_ids, tiny_llama

CONFIG = {"r": 8, "steps_per_iteration": 3, "warmup_steps_per_iteration": 2, "iterations_per_round": 2}


def _args(tmp_path, **overrides) -> TrainingArguments:
    return cpu_training_args(tmp_path, **{"max_steps": 14, **overrides})


class InvariantChecker(TrainerCallback):
    """Runs after SSTCallback at every step and records what acceptance point 3 asks for."""

    def __init__(self, model):
        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, SSTLinear)]
        self.rounds_seen = 0
        self.resvd_errors = []
        self.bad = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        allowed = set()
        for layer in self.layers:
            S = layer.sst_S["default"]
            Ua, Vha = layer.sst_U_active["default"], layer.sst_Vh_active["default"]
            allowed |= {id(S), id(Ua), id(Vha)}
            if (S < 0).any():
                self.bad.append(f"negative S at step {state.global_step}")
            if (Ua.norm(dim=0) - 1).abs().max() > 1e-5 or (Vha.norm(dim=1) - 1).abs().max() > 1e-5:
                self.bad.append(f"active vectors not unit norm at step {state.global_step}")
        rounds = int(self.layers[0].sst_counters["default"][1])
        if rounds > self.rounds_seen:
            self.rounds_seen = rounds
            for layer in self.layers:
                U, Vh = layer.sst_U["default"], layer.sst_Vh["default"]
                eye = torch.eye(U.shape[1])
                self.resvd_errors.append(
                    max((U.t() @ U - eye).abs().max().item(), (Vh @ Vh.t() - eye).abs().max().item())
                )
        # optimizer state only for active vectors, S and the non-SST trainables (never U / Vh, never frozen)
        inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        names = {id(p): n for n, p in self.model.named_parameters()}
        for param in inner.state:
            name = names.get(id(param), "?")
            if not param.requires_grad or (".sst_" in name and id(param) not in allowed):
                self.bad.append(f"optimizer state for {name}")
            if "sst_U." in name or "sst_Vh." in name or "base_layer.weight" in name:
                self.bad.append(f"optimizer state for frozen {name}")
        # state of active vectors was reset at the last iteration boundary
        into = (state.global_step - 1) % CONFIG["steps_per_iteration"] + 1
        st = inner.state.get(self.layers[0].sst_U_active["default"])
        if st is not None and int(st["step"]) != into:
            self.bad.append(
                f"active-vector state step {int(st['step'])} != {into} at step {state.global_step}"
            )


@pytest.mark.slow
def test_trainer_two_rounds_invariants(tmp_path):
    """Acceptance 3."""
    model = get_peft_model(tiny_llama(), SSTConfig(**CONFIG))
    checker = InvariantChecker(model)
    sst_callback = SSTCallback()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=13, logging_steps=6),
        train_dataset=RandomTokens(),
        callbacks=[sst_callback, checker],
    )
    before = [layer.sst_index["default"].clone() for layer in checker.layers]
    trainer.train()
    assert checker.bad == []
    assert checker.rounds_seen >= 2
    assert max(checker.resvd_errors) <= 1e-4
    after = [layer.sst_index["default"] for layer in checker.layers]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # vectors were re-sampled
    assert int(checker.layers[0].sst_counters["default"][0]) == 13 // 3
    logged = [h for h in trainer.state.log_history if "sst/effective_rank" in h]
    assert logged and logged[0]["sst/orthogonality_error"] <= 1e-4


def _final_state(model) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.update({n: b.clone() for n, b in model.named_buffers()})
    return out


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
    """Acceptance 5: checkpoint at step 7 (inside an iteration, during a re-warm-up) and resume."""

    def run(output_dir, resume=None, save_steps=None):
        model = get_peft_model(tiny_llama(), SSTConfig(**CONFIG))
        overrides = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {}
        trainer = Trainer(
            model=model,
            args=_args(output_dir, **overrides),
            train_dataset=RandomTokens(),
            callbacks=[SSTCallback()],
        )
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    full, _ = run(tmp_path / "full", save_steps=7)
    checkpoint = tmp_path / "full" / "checkpoint-7"
    assert (checkpoint / "leanformers" / "sst_controller.safetensors").is_file()
    resumed, trainer = run(tmp_path / "resumed", resume=str(checkpoint))
    assert trainer.state.global_step == 14
    a, b = _final_state(full), _final_state(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


def test_controller_refuses_unsupported_optimizer():
    model = get_peft_model(tiny_llama(), SSTConfig(r=4))
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="RMSprop is not supported.*Use torch.optim.Adam, AdamW or SGD"):
        SSTController(model, optimizer)


def test_trainer_refuses_unsupported_optimizer(tmp_path):
    model = get_peft_model(tiny_llama(), SSTConfig(r=4))
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1, optim="adafactor"),
        train_dataset=RandomTokens(8),
        callbacks=[SSTCallback()],
    )
    with pytest.raises(ValueError, match="Adafactor is not supported"):
        trainer.train()


def test_controller_needs_sst_layers():
    with pytest.raises(ValueError, match="holds no SST layer: wrap it with peft.get_peft_model"):
        SSTController(tiny_llama())


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    model = get_peft_model(tiny_llama(), SSTConfig(r=4, steps_per_iteration=2, warmup_steps_per_iteration=0))
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=3),
        train_dataset=RandomTokens(32),
        callbacks=[SSTCallback()],
    )
    trainer.train()
    layer = next(m for m in model.modules() if isinstance(m, SSTLinear))
    assert int(layer.sst_counters["default"][0]) == 2  # 4 optimizer steps / 2, not 12 micro-batches / 2


def test_lr_rewarmup_after_iteration_boundary():
    """The LR seen by optimizer.step ramps (j + 1) / (w + 1) after every boundary but the first."""
    model = get_peft_model(tiny_llama(), SSTConfig(r=4, steps_per_iteration=3, warmup_steps_per_iteration=2))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    controller = SSTController(model, optimizer)
    factors = []
    ids = random_ids()
    for _ in range(8):
        model(ids, labels=ids).loss.backward()
        factors.append(controller.rewarmup.factor)  # the factor the next optimizer.step applies
        optimizer.step()
        optimizer.zero_grad()
        controller.step(optimizer)
    assert factors == [1.0, 1.0, 1.0, 1 / 3, 2 / 3, 1.0, 1 / 3, 2 / 3]
    assert optimizer.param_groups[0]["lr"] == 1.0  # the user's LR is restored after each step


def test_controller_state_round_trip_in_a_custom_loop(tmp_path):
    model = get_peft_model(tiny_llama(), SSTConfig(r=4, steps_per_iteration=3, warmup_steps_per_iteration=2))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    controller = SSTController(model, optimizer)
    ids = random_ids()
    for _ in range(4):  # step 3 starts iteration 1; one re-warm-up step done
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.step(optimizer)
    controller.save(tmp_path)
    restored = SSTController(model)
    assert restored.load(tmp_path) and not SSTController(model).load(tmp_path / "elsewhere")
    restored.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    assert restored.global_step == 4
    assert (
        restored.rewarmup.state_dict()
        == controller.rewarmup.state_dict()
        == {"num_steps": 2, "steps_done": 1}
    )
