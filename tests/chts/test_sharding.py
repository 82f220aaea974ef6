"""Sharded training: FSDP2 accepted, FSDP1 and DeepSpeed ZeRO refused naming FSDP2 (issues 7 and 12).

Before issue 7, CHTss passed the optimizer check under ZeRO (which wraps a plain AdamW) and then
masked nothing (ZeRO's fp32 master weights never see the masks), or crashed on FSDP's sharded
parameters. FSDP2 is supported since issue 12 (two-process checks: test_fsdp.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from transformers import TrainerControl, TrainerState, TrainingArguments

from leanformers.chts import CHTssCallback, CHTssConfig, CHTssController
from tests.tiny_models import tiny_llama

CFG = CHTssConfig(final_density=0.3, update_interval=2)
NAMES_FSDP2 = r"Use (PyTorch )?FSDP2.*fsdp_version': 2.*recipes/accelerate/fsdp2\.yaml"


def test_fsdp1_training_arguments_are_refused_naming_fsdp2(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path), fsdp=True, fsdp_config={"fsdp_version": 1}, use_cpu=True, report_to=[]
    )
    callback = CHTssCallback(CFG)
    model = tiny_llama()
    message = r"CHTss does not support FSDP1 .*FlatParameter.*" + NAMES_FSDP2 + ".*Found: fsdp_version=1"
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


@pytest.mark.parametrize("fsdp_config", [{"fsdp_version": 2}, {}])
def test_fsdp2_training_arguments_are_accepted(tmp_path, fsdp_config):
    # {}: the Trainer's own default version (2 in transformers 5), read from args.fsdp_plugin_args; the
    # policy used to assume 1 there and refused a run the Trainer would have sharded with FSDP2.
    args = TrainingArguments(
        output_dir=str(tmp_path), fsdp=True, fsdp_config=fsdp_config, use_cpu=True, report_to=[]
    )
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    CHTssCallback(CFG).on_init_end(args, TrainerState(), TrainerControl(), model=tiny_llama())


def test_deepspeed_training_arguments_are_refused_naming_fsdp2(tmp_path):
    # deepspeed is not installed here, and TrainingArguments(deepspeed=...) imports it: the field is
    # set on a real TrainingArguments afterwards, as the user's value would be.
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    args.deepspeed = {"zero_optimization": {"stage": 2}}
    message = r"CHTss does not support DeepSpeed ZeRO: ZeRO keeps fp32 master.*" + NAMES_FSDP2
    with pytest.raises(ValueError, match=message):
        CHTssCallback(CFG).on_init_end(args, TrainerState(), TrainerControl(), model=tiny_llama())


def test_fully_sharded_model_trains_with_masks_per_shard(tmp_path):
    # A real FSDP2 model (one gloo process on CPU): the custom-loop controller accepts it, keeps the
    # masks as shards of the DTensor weights and masks weights, gradients and moments on them.
    from torch.distributed.fsdp import fully_shard

    from leanformers.training.fsdp import local

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = tiny_llama().train()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        cfg = CHTssConfig(final_density=0.3, update_interval=2, topology_end=1.0)
        sched = CHTssController(model, opt, cfg, total_steps=4)
        assert sched.sharded
        ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
        for _ in range(4):
            model(input_ids=ids, labels=ids).loss.backward()
            for layer in sched.layers:  # masked at the end of backward, before any clipping
                assert not bool(local(layer.weight.grad)[~layer.mask_param].any()), layer.name
            opt.step()
            sched.step()
            opt.zero_grad()
        assert len(sched.history) == 2
        for layer in sched.layers:
            weight, moment = local(layer.weight.data), local(opt.state[layer.weight]["exp_avg"])
            assert not bool(weight[~layer.mask_param].any()) and not bool(moment[~layer.mask_param].any())
        assert abs(sched.metrics()["chtss/density_sparse_subset"] - 0.3) < 0.01
    finally:
        dist.destroy_process_group()


def test_sharding_after_the_controller_was_built_is_refused(tmp_path):
    # Masks and gradient hooks of the unsharded parameters would miss the DTensor shards: a clear error.
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = tiny_llama()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = CHTssController(model, opt, CFG, total_steps=4)
        fully_shard(model)
        with pytest.raises(RuntimeError, match="sharded .fully_shard. after the CHTss controller was built"):
            sched.step()
    finally:
        dist.destroy_process_group()
