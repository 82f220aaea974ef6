"""CUDA paths (skipped without a GPU): L3n in TF32 vs CPU float32, scheduler on CUDA, big sampling."""

from __future__ import annotations

import pytest
import torch

from leanformers.chts import CHTssConfig, CHTssController
from leanformers.chts.predictors import l3n_scores
from leanformers.chts.sampling import select
from leanformers.chts.topology import link_count
from tests.tiny_models import random_ids, tiny_llama

pytestmark = pytest.mark.gpu


def test_l3n_cuda_matches_cpu():
    mask = torch.rand(4, 768, 2048, generator=torch.Generator().manual_seed(0)) < 0.3
    cpu = l3n_scores(mask, "CH2", chunk=512)
    for tf32 in (False, True):
        gpu = l3n_scores(mask.cuda(), "CH2", chunk=512, allow_tf32=tf32).cpu()
        torch.testing.assert_close(gpu, cpu, rtol=2e-3 if tf32 else 1e-5, atol=1e-3 if tf32 else 1e-5)


def test_soft_sampling_4096_by_11008_on_cuda():
    weight = torch.randn(4096, 11008, device="cuda")
    mask = torch.rand(4096, 11008, device="cuda") < 0.3
    n_keep = int(0.9 * int(mask.sum()))
    gen = torch.Generator(device="cuda").manual_seed(0)
    chosen, filled = select(weight.abs(), n_keep, mask, "soft", 9.0, gen)
    assert int(chosen.sum()) == n_keep and filled == 0 and not (chosen & ~mask).any()


def test_scheduler_on_cuda_bf16_model():
    model = tiny_llama().cuda().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = CHTssController(model, opt, CHTssConfig(final_density=0.3, update_interval=2), total_steps=12)
    for step in range(12):
        ids = random_ids(seed=step).cuda()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    for layer in sched.layers:
        assert layer.mask.is_cuda and int(layer.mask.sum()) == link_count(layer.shape, 0.3)
        assert (layer.logical(layer.weight.data)[~layer.mask] == 0).all()
