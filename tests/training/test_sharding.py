"""The one sharding policy of the training-time methods (training/sharding.py), as SST and CHTss apply it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import TrainingArguments

from leanformers.chts.controller import check_unsharded
from leanformers.sst.controller import check_backend
from leanformers.training import agree_with_rank0, check_sharding, sharded_training_backend, unwrap_model


def _args(tmp_path, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)


def test_both_methods_refuse_the_same_backends_with_the_same_message(tmp_path):
    deepspeed = _args(tmp_path)
    deepspeed.deepspeed = {"zero_optimization": {"stage": 2}}  # deepspeed is not installed: set afterwards
    fsdp1 = _args(tmp_path, fsdp=True, fsdp_config={"fsdp_version": 1})
    for method, check in (("SST", check_backend), ("CHTss", check_unsharded)):
        with pytest.raises(
            ValueError, match=rf"^{method} does not support DeepSpeed ZeRO: .*Use PyTorch FSDP2"
        ):
            check(args=deepspeed)
        with pytest.raises(ValueError, match=rf"^{method} does not support FSDP1 .*Found: fsdp_version=1\.$"):
            check(args=fsdp1)
        check(args=_args(tmp_path, fsdp=True))  # the Trainer's default version is FSDP2: accepted
        check(args=_args(tmp_path))  # one device / DDP
    assert sharded_training_backend(args=_args(tmp_path, fsdp=True)) == "FSDP2"


def test_deepspeed_optimizer_wrappers_are_seen_through_the_chain():
    class DeepSpeedZeroOptimizer:  # named like deepspeed's: detected by its qualified name
        def __init__(self, inner):
            self.optimizer = inner

    DeepSpeedZeroOptimizer.__module__ = "deepspeed.runtime.zero"
    inner = torch.optim.AdamW(nn.Linear(2, 2).parameters())
    wrapped = type("AcceleratedOptimizer", (), {"optimizer": DeepSpeedZeroOptimizer(inner)})()
    with pytest.raises(ValueError, match="^CHTss does not support DeepSpeed ZeRO"):
        check_sharding("CHTss", optimizer=wrapped)
    check_sharding("CHTss", optimizer=inner)


def test_unwrap_model_and_rank_agreement_in_one_process():
    inner = nn.Linear(3, 3)
    wrapper = nn.Module()
    wrapper.module = inner
    assert unwrap_model(wrapper) is inner and unwrap_model(inner) is inner
    mask = torch.tensor([True, False])
    assert agree_with_rank0(mask) == 0 and mask.tolist() == [True, False]
