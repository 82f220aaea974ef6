"""SST -> dense / spectrum-truncated PIFA or low-rank export."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from leanformers.export import choose_rank, save_sst_as_pifa, sst_spectra, sst_to_dense, sst_to_lowrank
from leanformers.sst import SSTConfig, SSTController
from tests.helpers import run_fresh
from tests.tiny_models import random_ids, tiny_gpt2, tiny_llama


def _trained_sst(factory=tiny_llama, steps=6):
    model = get_peft_model(factory(), SSTConfig(r=8, steps_per_iteration=2, warmup_steps_per_iteration=1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = SSTController(model, optimizer)
    ids = random_ids()
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.step(optimizer)
    return model.eval()


def test_choose_rank_rules():
    S = torch.tensor([4.0, 2.0, 1.0, 1.0])
    assert choose_rank(S, 8, 4, rank=10) == 4
    assert choose_rank(S, 8, 4, energy=16 / 22) == 1
    assert choose_rank(S, 8, 4, energy=20 / 22 + 1e-9) == 3
    assert choose_rank(S, 8, 4, density=0.5, layout="lowrank") == 1  # floor(0.5*32/12)
    with pytest.raises(ValueError, match="exactly one of rank=, density= or energy="):
        choose_rank(S, 8, 4, rank=1, density=0.5)
    with pytest.raises(ValueError, match=r"energy must be in \(0, 1\]"):
        choose_rank(S, 8, 4, energy=1.5)


@pytest.mark.parametrize("layout", ["pifa", "lowrank"])
def test_full_rank_export_reproduces_the_sst_model(layout):
    model = _trained_sst()
    ids = random_ids()
    with torch.no_grad():
        ref = model(ids).logits
    exported = sst_to_lowrank(model, rank=10**6, layout=layout)
    assert "SSTLinear" not in {type(m).__name__ for m in exported.modules()}
    expected = "PIFALinear" if layout == "pifa" else "LowRankLinear"
    assert type(exported.model.layers[0].mlp.up_proj).__name__ == expected
    with torch.no_grad():
        assert (exported(ids).logits - ref).abs().max() <= 1e-4


def test_truncated_export_equals_truncated_svd_of_each_layer():
    model = _trained_sst()
    spectra = sst_spectra(model)
    assert all(torch.all(S[:-1] >= S[1:]) for S in spectra.values())
    dense = sst_to_dense(copy.deepcopy(model))
    ids = random_ids()
    # reference: dense weights replaced by their rank-4 truncated SVD
    with torch.no_grad():
        for name, module in dense.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                U, S, Vh = torch.linalg.svd(module.weight.float(), full_matrices=False)
                module.weight.copy_((U[:, :4] * S[:4]) @ Vh[:4])
        ref = dense(ids).logits
    exported = sst_to_lowrank(model, rank=4)
    assert exported.model.layers[0].self_attn.q_proj.rank == 4
    with torch.no_grad():
        assert (exported(ids).logits - ref).abs().max() <= 1e-4


def test_gpt2_conv1d_export():
    model = _trained_sst(tiny_gpt2, steps=2)
    ids = random_ids()
    with torch.no_grad():
        ref = model(ids).logits
    exported = sst_to_lowrank(model, rank=64)
    with torch.no_grad():
        assert (exported(ids).logits - ref).abs().max() <= 1e-4


def test_export_needs_sst_model():
    with pytest.raises(ValueError, match="holds no SST layer"):
        sst_to_lowrank(tiny_llama(), rank=4)


@pytest.mark.integration
def test_saved_pifa_export_reloads_with_from_pretrained(tmp_path):
    model = _trained_sst()
    out = save_sst_as_pifa(model, tmp_path / "pifa", density=0.6)
    with torch.no_grad():  # the PeftModel now wraps the exported layers
        ref = model.get_base_model()(random_ids()).logits
    torch.save(ref, tmp_path / "ref.pt")
    result = run_fresh(
        f"""
        import torch, leanformers
        from transformers import AutoModelForCausalLM
        from tiny_models import random_ids
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        with torch.no_grad():
            print((model(random_ids()).logits - ref).abs().max().item())
        print(type(model.model.layers[0].mlp.up_proj).__name__)
        """
    )
    diff, kind = result.strip().splitlines()[-2:]
    assert float(diff) <= 1e-5 and kind == "PIFALinear"
