"""FSDP and DeepSpeed ZeRO are refused with a message naming the problem (issue 7; support: issue 12).

Before, CHTss passed the optimizer check under ZeRO (which wraps a plain AdamW) and then masked
nothing (ZeRO's fp32 master weights never see the masks), or crashed on FSDP's sharded parameters.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from transformers import TrainerControl, TrainerState, TrainingArguments

from leanformers.chts import CHTssCallback, CHTssConfig, CHTssScheduler
from tests.tiny_models import tiny_llama

CFG = CHTssConfig(final_density=0.3, update_interval=2)


def test_fsdp_training_arguments_are_refused(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path), fsdp=True, fsdp_config={"fsdp_version": 2}, use_cpu=True, report_to=[]
    )
    callback = CHTssCallback(CFG)
    model = tiny_llama()
    message = r"CHTss does not support FSDP training yet: FSDP shards .* tracked by issue 12"
    with pytest.raises(ValueError, match=message):
        callback.on_init_end(args, TrainerState(), TrainerControl(), model=model)
    with pytest.raises(ValueError, match=message):
        callback.on_train_begin(
            args,
            TrainerState(),
            TrainerControl(),
            model=model,
            optimizer=torch.optim.AdamW(model.parameters()),
        )


def test_deepspeed_training_arguments_are_refused(tmp_path):
    # deepspeed is not installed here, and TrainingArguments(deepspeed=...) imports it: the field is
    # set on a real TrainingArguments afterwards, as the user's value would be.
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    args.deepspeed = {"zero_optimization": {"stage": 2}}
    with pytest.raises(ValueError, match=r"does not support DeepSpeed training yet: ZeRO keeps fp32 master"):
        CHTssCallback(CFG).on_init_end(args, TrainerState(), TrainerControl(), model=tiny_llama())


def test_fully_sharded_model_is_refused(tmp_path):
    # A real FSDP2 model (one gloo process on CPU): the custom-loop scheduler refuses it too.
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = tiny_llama()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with pytest.raises(ValueError, match=r"CHTss does not support FSDP training yet.*issue 12"):
            CHTssScheduler(model, opt, CFG, total_steps=8)
    finally:
        dist.destroy_process_group()
