"""The controller protocol: SST and CHTss implement it; save / load / resume work the same for both."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import leanformers
from leanformers.chts import CHTssCallback, CHTssConfig, CHTssController
from leanformers.sst import SSTCallback, SSTConfig, SSTController
from leanformers.training import Controller, ControllerCallback
from tests.tiny_models import random_ids, tiny_llama

CHTSS = CHTssConfig(final_density=0.3, update_interval=2, zeta=0.3, targets=(r"^layers\.(0|2)$",), exclude=())


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Module()
    model.layers = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    model.forward = model.layers.forward
    return model


def _train_chtss(steps: int) -> tuple[nn.Module, CHTssController]:
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = CHTssController(model, optimizer, CHTSS, total_steps=8)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        model(torch.randn(8, 12, generator=gen)).square().mean().backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
    return model, controller


def test_sst_and_chtss_controllers_and_callbacks_share_one_protocol():
    sst = SSTController(get_peft_model(tiny_llama(), SSTConfig(r=4)))
    _, chtss = _train_chtss(0)
    for controller in (sst, chtss):
        assert isinstance(controller, Controller)
        assert controller.global_step == 0 and isinstance(controller.metrics(), dict)
    assert issubclass(SSTCallback, ControllerCallback) and issubclass(CHTssCallback, ControllerCallback)


def test_old_chtss_names_warn_and_are_not_public():
    import importlib
    import sys

    from leanformers.chts import CHTssScheduler

    assert "CHTssScheduler" not in leanformers.chts.__all__
    with pytest.warns(
        FutureWarning, match="CHTssScheduler is deprecated: use leanformers.chts.CHTssController"
    ):
        old = CHTssScheduler(_mlp(), None, CHTSS, total_steps=8)
    assert isinstance(old, CHTssController)
    with pytest.warns(FutureWarning, match="step_count is deprecated: use CHTssController.global_step"):
        assert old.step_count == 0
    optimizer = torch.optim.SGD(old.model.parameters(), lr=0.1)
    with pytest.warns(FutureWarning, match="attach_optimizer is deprecated: use CHTssController.attach"):
        old.attach_optimizer(optimizer)
    assert old.optimizer is optimizer
    with pytest.warns(FutureWarning, match="CHTssCallback.scheduler is deprecated"):
        assert CHTssCallback(CHTSS).scheduler is None
    sys.modules.pop("leanformers.chts.scheduler", None)
    with pytest.warns(FutureWarning, match="leanformers.chts.scheduler is deprecated"):
        assert importlib.import_module("leanformers.chts.scheduler").CHTssController is CHTssController


def test_chtss_custom_loop_resume_restores_masks_and_checks_the_step(tmp_path):
    model, controller = _train_chtss(4)  # two topology updates
    assert controller.global_step == 4 and len(controller.history) == 2
    controller.save(tmp_path)
    fresh = _mlp(seed=1)
    fresh.load_state_dict(model.state_dict())  # the weights of the same "checkpoint"
    restored = CHTssController(fresh, torch.optim.AdamW(fresh.parameters()), CHTSS, 8, init_masks=False)
    restored.resume(tmp_path, 4)
    assert restored.global_step == 4
    for name, mask in controller.masks.items():
        assert torch.equal(restored.masks[name], mask)
    with pytest.raises(ValueError, match="CHTss state in .* is at step 4 but training resumes at step 5"):
        restored.resume(tmp_path, 5)
    with pytest.raises(FileNotFoundError, match="resumes from .*elsewhere but it holds no CHTss state"):
        restored.resume(tmp_path / "elsewhere", 4)
    with pytest.raises(ValueError, match="non-zero entries outside the checkpoint's CHTss masks"):
        CHTssController(_mlp(seed=2), None, CHTSS, 8, init_masks=False).resume(tmp_path, 4)


def test_sst_resume_derives_a_missing_state_and_checks_a_saved_one(tmp_path):
    model = get_peft_model(tiny_llama(), SSTConfig(r=4, steps_per_iteration=3, warmup_steps_per_iteration=2))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    controller = SSTController(model, optimizer)
    ids = random_ids()
    for _ in range(4):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.step(optimizer)
    assert controller.metrics() == {}  # no round ended yet (round = ceil(k / r) iterations)
    controller.save(tmp_path)
    derived = SSTController(model)
    derived.resume(tmp_path / "no_state", 4)  # the schedule follows from the step alone
    derived.attach(optimizer)
    assert derived.global_step == 4 and derived.rewarmup.state_dict() == controller.rewarmup.state_dict()
    with pytest.raises(ValueError, match="SST state in .* is at step 4 but training resumes at step 7"):
        SSTController(model).resume(tmp_path, 7)
