"""Evaluation / generation reuse the effective weight U diag(S) Vh while the factors do not change,
with bit-identical outputs, and every change of the factors invalidates it."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import leanformers.sst.spectral as spectral
from leanformers.sst import SSTConfig, SSTController, SSTLinear
from tests.tiny_models import random_ids, tiny_gpt2, tiny_llama


@pytest.fixture
def builds(monkeypatch):
    """Counts how often any SST layer builds U_eff diag(S) Vh_eff (training, inference, cached or not)."""
    calls = {"n": 0}
    original = spectral._weight

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(spectral, "_weight", counting)
    return calls


def _layers(model) -> list[SSTLinear]:
    return [m for m in model.modules() if isinstance(m, SSTLinear)]


def _uncached(model, ids) -> torch.Tensor:
    layers = _layers(model)
    for layer in layers:
        layer.inference_cache = False
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for layer in layers:
            del layer.inference_cache


def _cached(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_no_grad_forwards_build_the_weight_once_and_match_the_training_path(builds):
    model = get_peft_model(tiny_llama(), SSTConfig(r=4))
    n_layers = len(_layers(model))
    ids = random_ids()
    model.train()
    for layer in _layers(model):  # the training path that builds the same weight: bit-identical
        layer.spectral_path = "materialized"
    training_path = model(ids).logits.detach()  # the autograd Function (dropout is 0 in the tiny model)
    for layer in _layers(model):
        del layer.spectral_path
    factored = model(ids).logits.detach()  # a few tokens: the factored product, same function
    builds["n"] = 0
    model.eval()
    first = _cached(model, ids)
    assert builds["n"] == n_layers
    second = _cached(model, ids)
    assert builds["n"] == n_layers  # reused
    assert torch.equal(first, training_path) and torch.equal(second, training_path)
    torch.testing.assert_close(factored, training_path, atol=1e-5, rtol=1e-5)


def test_every_change_of_the_factors_invalidates_the_cache():
    ids = random_ids()
    model = get_peft_model(
        tiny_llama(),
        SSTConfig(r=4, steps_per_iteration=1, warmup_steps_per_iteration=0, iterations_per_round=2),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    controller = SSTController(model, optimizer)
    layer = _layers(model)[0]
    previous = _cached(model, ids)

    def check(what: str) -> None:
        nonlocal previous
        now = _cached(model, ids)
        assert torch.equal(now, _uncached(model, ids)), f"stale cache after {what}"
        assert not torch.equal(now, previous), f"{what} changed nothing: the check is void"
        previous = now

    for step in range(2):  # optimizer step (fused: no version bump), re-sampling, then a re-SVD round end
        model.train()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.step(optimizer)
        model.eval()
        check(f"training step {step} + controller step")
    assert int(layer.sst_counters["default"][1]) == 1  # a re-SVD happened

    with torch.no_grad():  # in-place edits without gradients (version counters)
        layer.sst_S["default"].mul_(1.5)
    check("in-place S edit")
    with torch.no_grad():
        layer.sst_U_active["default"].copy_(torch.randn_like(layer.sst_U_active["default"]))
    check("in-place active-vector edit")

    other = get_peft_model(tiny_llama(seed=7), SSTConfig(r=4))
    model.load_state_dict(other.state_dict())
    check("load_state_dict")

    model.to(torch.float64)
    now = _cached(model, ids)
    assert now.dtype == torch.float64
    assert torch.equal(now, _uncached(model, ids))


def test_reloaded_frozen_adapter_and_generate_use_the_cache(tmp_path, builds):
    model = get_peft_model(tiny_gpt2(), SSTConfig(r=4))
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_gpt2(seed=3), tmp_path).eval()  # is_trainable=False: frozen
    ids = random_ids(1, 6)
    n_layers = len(_layers(reloaded))
    builds["n"] = 0
    out = reloaded.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert builds["n"] == n_layers  # once per layer for 5 decoding steps
    merged = PeftModel.from_pretrained(tiny_gpt2(seed=3), tmp_path).merge_and_unload().eval()
    expected = merged.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, expected)


def test_gradient_forward_frees_the_cache():
    model = get_peft_model(tiny_llama(), SSTConfig(r=4))
    ids = random_ids()
    _cached(model, ids)
    layer = _layers(model)[0]
    assert layer._sst_cache is not None
    model.train()
    model(ids, labels=ids).loss.backward()
    assert layer._sst_cache is None


def test_frozen_factors_still_pass_gradients_to_inputs_and_bias():
    """With factors frozen the cached path is used; x and a trainable bias must still get gradients."""
    from tests.tiny_models import tiny_qwen2

    model = get_peft_model(tiny_qwen2(), SSTConfig(r=4))
    for name, p in model.named_parameters():
        if ".sst_" in name:
            p.requires_grad_(False)
    ids = random_ids()
    model(ids, labels=ids).loss.backward()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.base_layer.bias.grad is not None and q.base_layer.bias.grad.abs().sum() > 0
    assert model.base_model.model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_autocast_gets_its_own_cached_weight():
    """bf16 autocast and fp32 forwards never share a cached weight; each equals the uncached path."""
    model = get_peft_model(tiny_llama(), SSTConfig(r=4))
    ids = random_ids()
    fp32 = _cached(model, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = _cached(model, ids)
        assert torch.equal(bf16, _uncached(model, ids))
        assert _layers(model)[0]._sst_cache[1].dtype == torch.bfloat16
    assert not torch.equal(bf16.float(), fp32)
    assert torch.equal(_cached(model, ids), fp32)
    assert _layers(model)[0]._sst_cache[1].dtype == torch.float32
