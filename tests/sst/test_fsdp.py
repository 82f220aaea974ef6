"""SST under PyTorch FSDP2 (``fully_shard``), issue 12: sharded training, resume, refused backends.

- one 2-process gloo launch (``fsdp_worker.py``) trains through the HF Trainer under FSDP2 with sharded
  (DCP) checkpoints and resumes from a copied checkpoint folder; its gathered state is compared here
  with a single-process run of the same global batch;
- in one process (a 1-rank gloo group), a custom loop over ``fully_shard`` modules matches the unsharded
  loop exactly;
- DeepSpeed ZeRO and FSDP1 are refused with messages naming FSDP2.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState, TrainingArguments

from leanformers import SSTCallback, SSTConfig, SSTController
from leanformers.sst import frozen_factors_as_parameters
from tests.helpers import REPO_ROOT, run_command
from tests.sst.fsdp_setup import MAX_STEPS, PER_DEVICE_BATCH, build, comparable, gathered_state, training_args
from tests.tiny_models import random_ids, tiny_llama

# Sharded vs single process with the same global batch: the same samples, steps and SST indices, but FSDP
# averages two per-rank gradients (another float32 summation order). SST amplifies such rounding where
# singular values are nearly equal: after a re-SVD the singular vectors of a near-degenerate pair may come out
# rotated, and S then trains in that other basis. One process does the same when only the summation order
# changes (gradient accumulation over the same global batch: the "control" run). So each entry of the sharded
# run (non-SST parameters, each SST layer's effective weight U_eff diag(S) Vh_eff and its S) must lie within
# CONTROL_FACTOR x the control's difference + ATOL of the single-process run. Measured (2 ranks, 8 SGD steps,
# 2 rounds): most entries differ by ~1e-6; the worst (a square 64x64 layer) by 1.5e-3 in S and 1.8e-4 in its
# weight, the same numbers as the control.
CONTROL_FACTOR = 2.0
ATOL = 1e-5


@pytest.mark.distributed
@pytest.mark.slow
def test_sst_trains_under_fsdp2_through_the_trainer_and_resumes_bit_identically(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561"]
    cmd += [str(REPO_ROOT / "tests" / "sst" / "fsdp_worker.py"), str(tmp_path)]
    proc = run_command(cmd, timeout=300, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())

    # really sharded: FSDP2 modules, S a DTensor split on dim 0, AdamW moments sharded too
    assert report["world_size"] == 2 and report["fsdp2"]
    assert report["S_placements"] == ["S(0)"] and report["S_local_numel"] * 2 == report["S_numel"]
    assert report["moment_sharded"] and report["U_sharded"] and report["mixed_requires_grad_unit"]
    assert report["inference_cache_off"] and report["inference_follows_shards"]
    # 2 SST rounds, every rank holds the same gathered parameters and SST state
    assert report["global_step"] == MAX_STEPS and report["rounds"] == 2 and report["iterations"] == 4
    assert report["state_identical_on_ranks"] and report["resumed_identical_on_ranks"]
    assert report["sst_entries"] > 0
    # a sharded checkpoint (DCP folders) with the controller state beside it
    assert {"pytorch_model_fsdp_0", "optimizer_0", "leanformers"} <= set(report["checkpoint_files"])

    sharded = load_file(str(tmp_path / "sharded.safetensors"))
    resumed = load_file(str(tmp_path / "resumed.safetensors"))
    # 2. resume from a copied checkpoint folder: bit-identical to the uninterrupted sharded run
    assert report["resumed_global_step"] == MAX_STEPS
    assert sharded.keys() == resumed.keys()
    different = [k for k in sharded if not torch.equal(sharded[k], resumed[k])]
    assert not different, different[:5]

    # the final adapter written from the sharded model reloads, unsharded, to exactly the trained state
    from peft import PeftModel

    reloaded = gathered_state(PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path / "final")))
    trained = {k: v for k, v in sharded.items() if not k.endswith("base_layer.weight")}  # freed: empty
    assert all(torch.equal(reloaded[k], v) for k, v in trained.items())

    # 1. the same global batch in one process (no FSDP): same indices and counters; parameters and effective
    # weights as close as a change of summation order allows (see CONTROL_FACTOR)
    single = _single_process(tmp_path / "single", per_device_train_batch_size=2 * PER_DEVICE_BATCH)
    control = _single_process(
        tmp_path / "accum", per_device_train_batch_size=PER_DEVICE_BATCH, gradient_accumulation_steps=2
    )
    assert single.keys() == sharded.keys()
    for key in single:
        if ".sst_index." in key or ".sst_counters." in key:
            assert torch.equal(single[key], sharded[key]), key
    single, sharded, control = comparable(single), comparable(sharded), comparable(control)
    start = comparable(gathered_state(build()[0]))
    moved = max(_diff(single[k], start[k]) for k in single)
    assert moved > 1e-2  # the comparison is not vacuous: training moved the weights
    too_far = {}
    for key in single:
        allowed = CONTROL_FACTOR * _diff(single[key], control[key]) + ATOL
        if _diff(single[key], sharded[key]) > allowed:
            too_far[key] = (_diff(single[key], sharded[key]), allowed)
    assert not too_far, too_far


def _single_process(output_dir, **overrides) -> dict[str, torch.Tensor]:
    from transformers import Trainer

    model, dataset = build()
    args = training_args(output_dir, save_strategy="no", **overrides)
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[SSTCallback()]).train()
    return gathered_state(model)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


@pytest.mark.distributed
def test_custom_loop_over_fully_shard_matches_the_unsharded_loop(tmp_path):
    """One rank (world size 1): FSDP2's DTensor path of every SST operation gives the unsharded bits."""
    import torch.distributed as dist
    from peft import get_peft_model
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def run(shard: bool) -> dict[str, torch.Tensor]:
        config = SSTConfig(r=4, steps_per_iteration=1, warmup_steps_per_iteration=0, iterations_per_round=2)
        model = get_peft_model(tiny_llama(seed=0), config)
        if shard:
            frozen_factors_as_parameters(model)  # U, Vh: frozen parameters, sharded by FSDP2
            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            up_proj = model.base_model.model.model.layers[0].mlp.up_proj
            assert isinstance(up_proj.sst_U_active["default"], DTensor)
            assert (
                isinstance(up_proj.sst_U["default"], DTensor) and not up_proj.sst_U["default"].requires_grad
            )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        controller = SSTController(model, optimizer)
        for step in range(4):  # 4 iterations, 2 rounds
            ids = random_ids(2, 12, seed=step)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            controller.step(optimizer)
        return gathered_state(model)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharded = run(shard=True)
    finally:
        dist.destroy_process_group()
    plain = run(shard=False)
    assert sharded.keys() == plain.keys()
    worst = max(
        float((sharded[k].double() - plain[k].double()).abs().max()) for k in plain if plain[k].numel()
    )
    assert worst < 1e-5, worst


def test_deepspeed_and_fsdp1_are_refused_naming_fsdp2(tmp_path):
    # deepspeed is not installed here, and TrainingArguments(deepspeed=...) imports it: the field is set on
    # a real TrainingArguments afterwards, as the user's value would be.
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    args.deepspeed = {"zero_optimization": {"stage": 3}}
    model = tiny_llama()
    message = r"SST does not support DeepSpeed ZeRO.*Use PyTorch FSDP2 instead.*fsdp_version': 2"
    with pytest.raises(ValueError, match=message):
        SSTCallback().on_init_end(args, TrainerState(), TrainerControl(), model=model)
    with pytest.raises(ValueError, match=message):
        SSTCallback().on_train_begin(
            args,
            TrainerState(),
            TrainerControl(),
            model=model,
            optimizer=torch.optim.AdamW(model.parameters()),
        )
    fsdp1 = TrainingArguments(
        output_dir=str(tmp_path), fsdp=True, fsdp_config={"fsdp_version": 1}, use_cpu=True, report_to=[]
    )
    with pytest.raises(ValueError, match=r"SST does not support FSDP1.*Use FSDP2.*fsdp_version=1"):
        SSTCallback().on_init_end(fsdp1, TrainerState(), TrainerControl(), model=model)
