"""Guards around SST training: a run without the schedule driver is reported, and DDP does not
re-broadcast U / Vh before every forward."""

from __future__ import annotations

import json
import warnings

import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from leanformers.sst import SSTCallback, SSTConfig, SSTController
from tests.helpers import RandomTokens, cpu_training_args, run_fresh
from tests.tiny_models import random_ids, tiny_llama

NO_CONTROLLER = "no SSTController / SSTCallback drives the SST schedule"


def _args(tmp_path, **overrides) -> TrainingArguments:
    return cpu_training_args(tmp_path, **overrides)


def _sst_warnings(record) -> list[str]:
    return [str(w.message) for w in record if NO_CONTROLLER in str(w.message)]


def _model():
    return get_peft_model(tiny_llama(), SSTConfig(r=4, steps_per_iteration=2, warmup_steps_per_iteration=1))


def test_trainer_without_sst_callback_warns_once_naming_the_fix(tmp_path):
    model = _model()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=RandomTokens())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    messages = _sst_warnings(record)
    assert len(messages) == 1, messages
    assert "SSTCallback()" in messages[0] and "controller.step(optimizer)" in messages[0]


def test_trainer_with_sst_callback_does_not_warn(tmp_path):
    model = _model()
    trainer = Trainer(
        model=model, args=_args(tmp_path), train_dataset=RandomTokens(), callbacks=[SSTCallback()]
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    assert _sst_warnings(record) == []


def test_custom_loop_warns_without_controller_and_not_with_it():
    ids = random_ids()
    for use_controller in (False, True):
        model = _model()
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        controller = SSTController(model, optimizer) if use_controller else None
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for _ in range(3):
                model(ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if controller is not None:
                    controller.step(optimizer)
        assert len(_sst_warnings(record)) == (0 if use_controller else 1)


def test_backward_without_optimizer_step_does_not_warn():
    """Gradients alone (e.g. a saliency pass) change nothing: no warning."""
    model = _model()
    model.train()
    ids = random_ids()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            model(ids, labels=ids).loss.backward()
    assert _sst_warnings(record) == []


DDP_BUFFERS = """
import json, os, tempfile, torch, torch.distributed as dist
store = os.path.join(tempfile.mkdtemp(), "store")  # a file store: no TCP port to collide on
dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
from peft import get_peft_model
from transformers import Trainer, TrainingArguments
import leanformers
from tiny_models import tiny_llama
report = {{}}
for how in ("trainer_callback", "plain_ddp"):
    model = get_peft_model(tiny_llama(), leanformers.SSTConfig(r=4))
    if how == "trainer_callback":
        args = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none")
        trainer = Trainer(model=model, args=args, callbacks=[leanformers.SSTCallback()])
        model = trainer.model
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    sst = {{id(b) for n, b in model.named_buffers() if ".sst_U." in n or ".sst_Vh." in n}}
    broadcast = [b for b in ddp.modules_buffers if id(b) in sst]
    ids = torch.randint(0, 128, (2, 8))
    ddp(input_ids=ids, labels=ids).loss.backward()
    report[how] = {{"sst_buffers": len(sst), "sst_buffers_broadcast": len(broadcast),
                    "grads": sum(p.grad is not None for p in model.parameters())}}
dist.destroy_process_group()
print(json.dumps(report))
"""


def test_ddp_does_not_broadcast_sst_factors_before_every_forward():
    """U / Vh (1.4x the model) stay off DDP's per-forward buffer broadcast, with the Trainer or plain DDP."""
    report = json.loads(run_fresh(DDP_BUFFERS.format()).strip().splitlines()[-1])
    for how, row in report.items():
        assert row["sst_buffers"] > 0 and row["grads"] > 0, (how, row)
        assert row["sst_buffers_broadcast"] == 0, (how, row)
