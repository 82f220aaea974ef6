"""Run under torchrun (2 processes, gloo): SST + DDP with different data per rank; rank 0 writes a report.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/sst/ddp_worker.py OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from peft import get_peft_model  # noqa: E402

from leanformers.sst import SSTConfig, SSTController, SSTLinear  # noqa: E402
from tests.tiny_models import random_ids, tiny_llama  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = get_peft_model(
        tiny_llama(seed=0),
        SSTConfig(r=8, steps_per_iteration=2, warmup_steps_per_iteration=1, iterations_per_round=2),
    )
    torch.manual_seed(1000 + rank)  # ranks' global RNGs differ: sampling must not depend on them
    # DDP's default broadcast_buffers=True: SST puts U, Vh, indices and counters on DDP's ignore list (they
    # are identical by construction), so they must not be re-broadcast before every forward
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    sst_buffers = {id(b) for n, b in model.named_buffers() if ".sst_" in n}
    sst_buffers_broadcast = sum(id(b) in sst_buffers for b in ddp.modules_buffers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = SSTController(ddp, optimizer)
    layers = [m for m in model.modules() if isinstance(m, SSTLinear)]
    start_idx = torch.cat([layer.sst_index["default"] for layer in layers])
    for step in range(9):  # 2 rounds (round = 2 iterations of 2 steps) and one more step
        ids = random_ids(2, 16, seed=100 * rank + step)  # different data on every rank
        ddp(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.step(optimizer)
    state = {n: p.detach() for n, p in model.named_parameters()}
    state.update(dict(model.named_buffers()))
    flat = torch.cat([t.double().reshape(-1) for _, t in sorted(state.items())])
    idx = torch.cat([layer.sst_index["default"] for layer in layers])
    gathered_flat = [torch.zeros_like(flat) for _ in range(2)]
    gathered_idx = [torch.zeros_like(idx) for _ in range(2)]
    dist.all_gather(gathered_flat, flat)
    dist.all_gather(gathered_idx, idx)
    if rank == 0:
        report = {
            "params_identical": bool(torch.equal(gathered_flat[0], gathered_flat[1])),
            "indices_identical": bool(torch.equal(gathered_idx[0], gathered_idx[1])),
            "indices_changed": not torch.equal(start_idx, idx),
            "rounds": int(layers[0].sst_counters["default"][1]),
            "world_size": dist.get_world_size(),
            "sst_buffers": len(sst_buffers),
            "sst_buffers_broadcast": sst_buffers_broadcast,
        }
        Path(out).write_text(json.dumps(report))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
