"""Two gloo processes (DDP on CPU) hold identical masks after several topology updates."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, out_dir: str, methods: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for method in methods:
            _train(rank, method, out_dir)
    finally:
        dist.destroy_process_group()


def _train(rank: int, method: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from leanformers.chts import CHTssConfig, CHTssController
    from leanformers.chts.mlp import MLP_TARGETS, MLPClassifier

    torch.manual_seed(0)
    model = MLPClassifier((64, 48, 48, 10))
    torch.manual_seed(100 + rank)  # the global RNG differs per rank: masks must not depend on it
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    # "mest": CHTs with MEST removal (|w| + lambda |dense grad|); lambda 1 so the gradient decides.
    extra = {"removal": "mest", "mest_lambda": 1.0} if method == "mest" else {}
    cfg = CHTssConfig.for_method(
        "chts" if method == "mest" else method,
        **extra,
        final_density=0.1,
        targets=MLP_TARGETS,
        exclude=(),
        update_interval=2,
        zeta=0.3,
        chain_removal=True,
    )
    sched = CHTssController(ddp, opt, cfg, total_steps=16)
    g = torch.Generator().manual_seed(rank)  # each rank sees different data (local gradients differ)
    for _ in range(16):
        x = torch.randn(8, 64, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        ddp(x, y)["loss"].backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert len(sched.history) == 6
    torch.save(
        {
            "masks": sched.masks,
            "params": [p.detach().clone() for p in model.parameters()],
            "disagreement": [h["chtss/rank_disagreement"] for h in sched.history],
        },
        os.path.join(out_dir, f"{method}_rank{rank}.pt"),
    )


@pytest.mark.distributed
def test_two_gloo_processes_hold_identical_masks(tmp_path):
    # CHTs (soft sampling, seeded generators) and RigL (rank-local dense gradients: only the rank-0
    # broadcast makes them agree), each with chain removal, six updates, one process group.
    methods = ("chts", "rigl")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), methods), nprocs=2, join=True)
    for method in methods:
        r0 = torch.load(tmp_path / f"{method}_rank0.pt")
        r1 = torch.load(tmp_path / f"{method}_rank1.pt")
        assert r0["masks"].keys() == r1["masks"].keys()
        for name in r0["masks"]:
            assert torch.equal(r0["masks"][name], r1["masks"][name]), (method, name)
        for p0, p1 in zip(r0["params"], r1["params"]):
            assert torch.equal(p0, p1)
        assert r1["disagreement"] == [0.0] * 6, method  # RigL: reduced gradients, no broadcast needed


@pytest.mark.distributed
def test_mest_under_ddp_scores_with_the_reduced_gradient_on_every_rank(tmp_path):
    # Issue 7: each rank scored MEST removal with its own un-reduced gradient and kept different
    # links; rank 0's broadcast mask then made the ranks zero different moments (parameters diverged).
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), ("mest",)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "mest_rank0.pt")
    r1 = torch.load(tmp_path / "mest_rank1.pt")
    # Every rank chose the same links itself (reduced gradients), not only after rank 0's broadcast.
    assert r1["disagreement"] == [0.0] * 6
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
    for p0, p1 in zip(r0["params"], r1["params"]):
        assert torch.equal(p0, p1)
