"""The ``ddp`` or the ``fsdp2`` rows of the contract table in ONE 2-process gloo launch (HF Trainer, CPU).

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/contract/dist_worker.py OUT.json ROW_ID...

Every rank trains each row's method for 6 optimizer steps on its own shard of the data (the Trainer's
distributed sampler), then rank 0 compares the ranks: parameters, buffers and the method's state
(SST sampled indices, DST masks) must be bit-identical. OUT: row id -> report.

``fsdp2`` rows train under FSDP2 (``tests/fsdp_trainer.FSDPTrainer``): parameters are DTensor shards,
so they are compared gathered, and the report adds what only holds per shard (see :func:`_fsdp2_report`).
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.contract.checks import buffers_of, make_trainer, method_state, params_of, wrap  # noqa: E402
from tests.contract.table import FSDP2_OP, ROWS  # noqa: E402
from tests.fsdp_trainer import FSDP2_CONFIG, FSDPTrainer, gathered_params  # noqa: E402


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().double().reshape(-1) for _, t in sorted(tensors.items())])


def _same_on_all_ranks(x: torch.Tensor) -> bool:
    gathered = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def run_row(row, out_dir: Path) -> dict:
    rank = dist.get_rank()
    from transformers import TrainerCallback

    model, callbacks = wrap(row)
    start = {}

    class Start(TrainerCallback):  # after the method's callback: its masks / indices exist by now
        def on_train_begin(self, args, state, control, **kwargs):
            start["state"] = _flat(method_state(model, callbacks))

    fsdp = row.op == FSDP2_OP
    extra = dict(fsdp=True, fsdp_config=dict(FSDP2_CONFIG), trainer_class=FSDPTrainer) if fsdp else {}
    trainer = make_trainer(
        model, [*callbacks, Start()], row, out_dir / row.id, max_steps=6, ddp_backend="gloo", **extra
    )
    torch.manual_seed(1000 + rank)  # ranks' global RNGs differ: nothing may depend on them
    trainer.train()
    state = method_state(model, callbacks)
    if fsdp:
        return _fsdp2_report(trainer, callbacks, state, start["state"])
    wrapped = trainer.model_wrapped
    sst = {id(b) for n, b in model.named_buffers() if ".sst_" in n}
    per_forward = (
        list(getattr(wrapped, "modules_buffers", [])) if getattr(wrapped, "broadcast_buffers", False) else []
    )
    return {
        "global_step": trainer.state.global_step,
        "params_identical": _same_on_all_ranks(_flat(params_of(model))),
        "buffers_identical": _same_on_all_ranks(_flat(buffers_of(model))),
        "state_identical": _same_on_all_ranks(_flat(state)),
        "state_entries": len(state),
        "state_changed": not torch.equal(start["state"], _flat(state)),
        "wrapper": type(wrapped).__name__,
        "sst_buffers": len(sst),
        "sst_buffers_broadcast": sum(id(b) in sst for b in per_forward),
    }


def _fsdp2_report(trainer, callbacks, state: dict, start_state: torch.Tensor) -> dict:
    """What an FSDP2 row checks: sharded weights, masks held and applied per shard, identical state."""
    from torch.distributed.tensor import DTensor

    from leanformers.training.fsdp import local

    model = trainer.model
    report = {
        "global_step": trainer.state.global_step,
        "wrapper": "FSDP2"
        if all(isinstance(p, DTensor) for p in model.parameters())
        else type(model).__name__,
        "params_identical": _same_on_all_ranks(_flat(gathered_params(model))),
        "state_identical": _same_on_all_ranks(_flat(state)),
        "state_entries": len(state),
        "state_changed": not torch.equal(start_state, _flat(state)),
    }
    controller = next((getattr(c, "controller", None) for c in callbacks), None)
    layers = getattr(controller, "layers", None)
    if layers is not None:  # DST: masks as local shards, zero weights and moments outside them
        moments = controller.optimizer.state
        report["masks_local"] = all(layer.mask_param.shape == local(layer.weight).shape for layer in layers)
        report["zero_outside_masks"] = all(
            not bool(local(layer.weight.data)[~layer.mask_param].any())
            and not bool(local(moments[layer.weight]["exp_avg"])[~layer.mask_param].any())
            for layer in layers
        )
        report["disagreement"] = sum(h.get("chtss/rank_disagreement", 0.0) for h in controller.history)
    return report


def main(out: str, ids: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rows = [r for r in ROWS if r.id in ids]
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            try:
                reports[row.id] = run_row(row, Path(tmp) / str(dist.get_rank()))
            except Exception as exc:  # recorded and judged by the row's expectation
                reports[row.id] = {"error": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}
            dist.barrier()
    if dist.get_rank() == 0:
        reports["_world_size"] = dist.get_world_size()
        Path(out).write_text(json.dumps(reports))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
