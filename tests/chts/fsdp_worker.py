"""CHTs-family methods under FSDP2 through the HF Trainer: ONE 2-process gloo launch (CPU).

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/chts/fsdp_worker.py OUT_DIR METHOD...

Per method, rank 0 writes ``OUT_DIR/<method>.pt``:
- ``full``: the gathered parameters and masks after an uninterrupted 8-step sharded run (checkpoint at
  step 4, sharded by torch.distributed.checkpoint);
- ``resumed``: the same after a fresh model resumed from a COPY of that checkpoint folder;
- ``checks``: what every rank checked (DTensor Shard(0) weights, masks held as local shards, method
  state identical on every rank, state saved once, the masks saved with the whole model by rank 0).

:func:`train` is also the single-process reference run (``fsdp=False``, global batch in one process).
"""

from __future__ import annotations

import shutil
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.contract.checks import Tokens  # noqa: E402
from tests.fsdp_trainer import FSDP2_CONFIG, FSDPTrainer, gathered_params  # noqa: E402
from tests.tiny_models import tiny_llama  # noqa: E402

STEPS, SAVE_AT, GLOBAL_BATCH = 8, 4, 4
TARGETS = (r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",)
OPTIONS = {
    # update_interval 2 over the whole run: topology updates at steps 2, 4, 6 and 8.
    "chtss": dict(initial_density=0.6, final_density=0.4),
    "rigl": dict(final_density=0.5),
    "mest": dict(final_density=0.5, removal="mest", mest_lambda=1.0),
    "set": dict(final_density=0.5),
}


# RigL's sharded runs accumulate 2 micro-batches of 1 per rank (same global batch): its dense
# gradients are then summed over micro-batches from the masked .grad shards (controller._mask_sharded_grads).
ACCUMULATE = {"rigl": 2}


def config(method: str):
    from leanformers import CHTssConfig

    preset = "set" if method == "mest" else method
    return CHTssConfig.for_method(
        preset,
        **OPTIONS[method],
        targets=TARGETS,
        exclude=(),
        update_interval=2,
        topology_end=1.0,
        zeta=0.3,
    )


def train(method: str, out: Path, fsdp: bool, resume_from: Path | None = None, accumulate: int = 1):
    """(trainer, callback) after STEPS steps on a fixed data order (sequential sampler).

    ``accumulate``: gradient accumulation steps (the global batch stays GLOBAL_BATCH).
    """
    from transformers import Trainer, TrainingArguments

    from leanformers import CHTssCallback

    world = dist.get_world_size() if dist.is_initialized() else 1
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=GLOBAL_BATCH // world // accumulate,
        gradient_accumulation_steps=accumulate,
        max_steps=STEPS,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        train_sampling_strategy="sequential",
        save_strategy="steps",
        save_steps=SAVE_AT,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **(dict(fsdp=True, fsdp_config=dict(FSDP2_CONFIG), ddp_backend="gloo") if fsdp else {}),
    )
    callback = CHTssCallback(config(method))
    cls = FSDPTrainer if fsdp else Trainer
    # intermediate 97: gate/up have an odd number of rows, so the two ranks' shards differ in size (49 / 48)
    model = tiny_llama(intermediate=97)
    trainer = cls(model=model, args=args, train_dataset=Tokens("causal", n=32), callbacks=[callback])
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return trainer, callback


def _same_on_all_ranks(tensors: list[torch.Tensor]) -> bool:
    flat = torch.cat([t.detach().double().reshape(-1) for t in tensors])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def _snapshot(trainer, callback) -> dict:
    controller = callback.controller
    masks = {k: v.clone().cpu() for k, v in controller.masks.items()}  # gathered: every rank calls
    return {"params": gathered_params(trainer.model), "masks": masks, "history": controller.history}


def run(method: str, root: Path) -> dict:
    from torch.distributed.tensor import DTensor, Shard

    from leanformers.chts import load_masks
    from leanformers.training.fsdp import local, save_full_model

    rank = dist.get_rank()
    accumulate = ACCUMULATE.get(method, 1)
    trainer, callback = train(method, root / "run", fsdp=True, accumulate=accumulate)
    controller = callback.controller
    layers = controller.layers
    tensors, meta = controller.checkpoint_state()
    checks = {
        "updates": len(controller.history),
        "dtensor_shard0": all(
            isinstance(layer.weight, DTensor) and tuple(layer.weight.placements) == (Shard(0),)
            for layer in layers
        ),
        # each rank holds only its rows of every mask, laid out like its shard of the weight
        "masks_local": all(
            layer.mask_param.shape == local(layer.weight).shape
            and layer.mask_param.numel() < layer.weight.numel()
            for layer in layers
        ),
        "state_identical": _same_on_all_ranks(
            [t.double() for _, t in sorted(tensors.items())] + [torch.tensor([float(meta["step_count"])])]
        ),
        "zero_outside_masks": all(
            not bool((local(layer.weight.data)[~layer.mask_param] != 0).any()) for layer in layers
        ),
        "disagreement": [h["chtss/rank_disagreement"] for h in controller.history],
    }
    full = _snapshot(trainer, callback)
    # the whole model, written by rank 0 alone (save_pretrained): the masks go with it, no collective
    save_full_model(trainer, root / "final")
    if rank == 0:
        saved = load_masks(root / "final")
        checks["masks_saved_with_model"] = saved.keys() == full["masks"].keys() and all(
            torch.equal(saved[k], full["masks"][k]) for k in saved
        )
    ckpt = root / "run" / f"checkpoint-{SAVE_AT}"
    copied = root / "copied" / "somewhere-else"
    if rank == 0:
        checks["state_files"] = sorted(p.name for p in (ckpt / "leanformers").iterdir())
        checks["sharded_checkpoint"] = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
        shutil.copytree(ckpt, copied)
    dist.barrier()
    trainer, callback = train(method, root / "resumed", fsdp=True, resume_from=copied, accumulate=accumulate)
    resumed = _snapshot(trainer, callback)
    return {"checks": checks, "full": full, "resumed": resumed}


def main(out: str, methods: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=180))
    out_dir = Path(out)
    for method in methods:
        report = run(method, out_dir / method)  # one folder for all ranks: sharded checkpoints
        if dist.get_rank() == 0:
            torch.save(report, out_dir / f"{method}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
