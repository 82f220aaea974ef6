"""Run under torchrun (2 processes, gloo, CPU): SST trained by the HF Trainer under FSDP2 (``fully_shard``).

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/sst/fsdp_worker.py OUT_DIR

1. run A: 8 optimizer steps (2 SST rounds), a sharded checkpoint at step 5; rank 0 writes the gathered
   full parameters and SST buffers to OUT_DIR/sharded.safetensors;
2. run B: a fresh model resumes from a COPY of A's checkpoint-5 and trains to step 8; its gathered state
   goes to OUT_DIR/resumed.safetensors;
3. OUT_DIR/report.json: what the ranks saw (parameter placements, identical method state, inference
   after training equal to a fresh evaluation of the factors, ...).
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import save_file  # noqa: E402

from tests.sst.fsdp_setup import (  # noqa: E402
    CHECKPOINT_STEP,
    build,
    cpu_fsdp2_trainer_class,
    fsdp_training_args,
    gathered_state,
)


def _same_on_all_ranks(tensors: dict[str, torch.Tensor]) -> bool:
    flat = torch.cat([t.detach().double().reshape(-1) for _, t in sorted(tensors.items())])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def train(out_dir: Path, resume_from: Path | None = None):
    from leanformers import SSTCallback

    model, dataset = build()
    args = fsdp_training_args(out_dir)
    trainer = cpu_fsdp2_trainer_class()(
        model=model, args=args, train_dataset=dataset, callbacks=[SSTCallback()]
    )
    torch.manual_seed(1000 + dist.get_rank())  # ranks' global RNGs differ: nothing may depend on them
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return trainer


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=180))
    rank = dist.get_rank()
    out_dir = Path(out)
    report: dict = {"world_size": dist.get_world_size()}

    from torch.distributed.tensor import DTensor

    from leanformers.sst import SSTLinear
    from leanformers.training.fsdp import is_fsdp2_model, save_full_model

    # --- run A: uninterrupted sharded run (saves checkpoint-5 on the way)
    trainer = train(out_dir / "a")
    model = trainer.model
    layer = next(m for m in model.modules() if isinstance(m, SSTLinear))
    S = layer.sst_S["default"]
    report["fsdp2"] = is_fsdp2_model(model)
    report["S_placements"] = [str(p) for p in S.placements] if isinstance(S, DTensor) else None
    report["S_local_numel"] = S.to_local().numel() if isinstance(S, DTensor) else None
    report["S_numel"] = S.numel()
    U = layer.sst_U["default"]  # frozen factors: parameters without gradient, sharded as well
    report["U_sharded"] = (
        isinstance(U, DTensor) and not U.requires_grad and U.to_local().numel() * 2 == U.numel()
    )
    # one FSDP unit (a decoder layer) holds trainable and frozen parameters side by side
    unit = model.base_model.model.model.layers[0]
    flags = {p.requires_grad for p in unit.parameters()}
    report["mixed_requires_grad_unit"] = flags == {True, False}
    report["rounds"] = int(layer.sst_counters["default"][1])
    report["iterations"] = int(layer.sst_counters["default"][0])
    report["global_step"] = trainer.state.global_step
    report["inference_cache_off"] = not layer.inference_cache
    # (the SST factors' moments were just reset by the iteration that began at step 8; the embedding's stay)
    embedding = model.get_input_embeddings().weight
    moment = trainer.optimizer.state.get(embedding, {}).get("momentum_buffer")
    report["moment_sharded"] = isinstance(moment, DTensor) and moment.to_local().numel() < embedding.numel()
    state = gathered_state(model)  # collective: every rank
    report["state_identical_on_ranks"] = _same_on_all_ranks(state)
    sst_state = {k: v for k, v in state.items() if ".sst_" in k}
    report["sst_entries"] = len(sst_state)
    save_full_model(trainer, out_dir / "final")  # what leanformers.train does at the end (collective)

    # inference after training (no gradients) equals the logits of the factors as they are now: the SST
    # layers' inference cache cannot serve a stale weight under FSDP2
    ids = torch.arange(24).reshape(2, 12) % 100
    model.eval()
    with torch.no_grad():
        logits_1 = model(input_ids=ids).logits
        for lay in (m for m in model.modules() if isinstance(m, SSTLinear)):
            lay.sst_S["default"].mul_(1.5)  # a real change of the sharded factor
        logits_2 = model(input_ids=ids).logits
    report["inference_follows_shards"] = not torch.allclose(logits_1, logits_2)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "sharded.safetensors"))
        ckpt = out_dir / "a" / f"checkpoint-{CHECKPOINT_STEP}"
        report["checkpoint_files"] = sorted(p.name for p in ckpt.iterdir())
        copy = out_dir / "copied-checkpoint"
        shutil.copytree(ckpt, copy)
        shutil.rmtree(out_dir / "a" / f"checkpoint-{CHECKPOINT_STEP}")  # the copy is the only one left
    dist.barrier()

    # --- run B: resume from the copied folder, train to the same final step
    trainer_b = train(out_dir / "b", resume_from=out_dir / "copied-checkpoint")
    resumed = gathered_state(trainer_b.model)
    report["resumed_global_step"] = trainer_b.state.global_step
    report["resumed_identical_on_ranks"] = _same_on_all_ranks(resumed)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in resumed.items()}, str(out_dir / "resumed.safetensors"))
        (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
