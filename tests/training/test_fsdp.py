"""training/fsdp.py helpers: plain tensors pass through; DTensor shards gather and scatter back exactly.

Two-rank behaviour (uneven shards included) is exercised by tests/chts/test_fsdp.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from leanformers.training.fsdp import gather_full, is_dtensor, local, shard_like, write_full_


def test_plain_tensors_pass_through():
    t = torch.randn(5, 3)
    assert not is_dtensor(t)
    assert local(t) is t and gather_full(t) is t and shard_like(t, t) is t
    target = torch.zeros(5, 3)
    write_full_(target, t)
    assert torch.equal(target, t)


def test_dtensor_shards_round_trip_bool_and_float(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = distribute_tensor(torch.randn(7, 4), mesh, [Shard(0)])
        assert is_dtensor(weight) and local(weight).shape == (7, 4)
        full = torch.randn(7, 4)
        write_full_(weight, full)  # in place, through the local shard
        assert torch.equal(gather_full(weight), full)
        mask = torch.rand(7, 4) > 0.5
        shard = shard_like(mask, weight)
        assert shard.dtype == torch.bool and shard.shape == local(weight).shape
        assert torch.equal(gather_full(shard, weight), mask)
    finally:
        dist.destroy_process_group()
