"""CUDA paths of SST (skipped without a GPU): bf16 autocast training and the speed of the fused layer."""

from __future__ import annotations

import time

import pytest
import torch

from leanformers.sst.spectral import effective_weight, spectral_linear, thin_svd

pytestmark = pytest.mark.gpu


def _factors(m, n, r, device):
    W = torch.randn(m, n, device=device) / n**0.5
    U, S, Vh = thin_svd(W)
    idx = torch.randperm(min(m, n), device=device)[:r].sort().values
    return W, U, S, Vh, idx


def test_cuda_gradient_identity_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    _, U, S, Vh, idx = _factors(96, 64, 8, "cuda")
    Ua, Vha = U[:, idx].clone().requires_grad_(), Vh[idx].clone().requires_grad_()
    S_p = S.clone().requires_grad_()
    x = torch.randn(4, 32, 64, device="cuda")
    spectral_linear(x, S_p, Ua, Vha, None, U, Vh, idx, enhanced=False).square().sum().backward()
    W = effective_weight(U, S, Vh, idx, Ua.detach(), Vha.detach()).requires_grad_()
    (x @ W.t()).square().sum().backward()
    expected = torch.einsum("mk,mn,kn->k", U, W.grad, Vh)
    torch.testing.assert_close(S_p.grad, expected, rtol=1e-4, atol=1e-3)


def test_cuda_bf16_autocast_llama_step():
    from peft import get_peft_model

    from leanformers.sst import SSTConfig, SSTController
    from tests.tiny_models import random_ids, tiny_llama

    model = get_peft_model(
        tiny_llama().cuda(), SSTConfig(r=8, steps_per_iteration=2, warmup_steps_per_iteration=1)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    controller = SSTController(model, optimizer)
    ids = random_ids().cuda()
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.step(optimizer)
    assert torch.isfinite(loss)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.sst_S["default"].dtype == torch.float32 and (layer.sst_S["default"] >= 0).all()


def _time(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


@pytest.mark.parametrize(("m", "n", "tokens"), [(2048, 2048, 16384), (5461, 2048, 16384)])
def test_cuda_fused_layer_training_step_within_0_9x_of_dense(m, n, tokens):
    """The issue's speed target at layer level: forward + backward of the SST layer (r = 128) under bf16
    autocast at least 0.9x the tokens/s of nn.Linear at a pretraining batch (16k tokens)."""
    _, U, S, Vh, idx = _factors(m, n, 128, "cuda")
    S_p = S.clone().requires_grad_()
    Ua, Vha = U[:, idx].clone().requires_grad_(), Vh[idx].clone().requires_grad_()
    dense = torch.nn.Linear(n, m, bias=False, device="cuda")
    x = torch.randn(tokens, n, device="cuda", requires_grad=True)

    def sst_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = spectral_linear(x, S_p, Ua, Vha, None, U, Vh, idx)
        y.float().sum().backward()

    def dense_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = dense(x)
        y.float().sum().backward()

    ratio = _time(dense_step) / _time(sst_step)
    print(f"SST / dense tokens/s at {m}x{n}, {tokens} tokens: {ratio:.2f}")
    assert ratio >= 0.9
