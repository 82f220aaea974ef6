"""Healing by distillation (issue 20): the KL maths, only the compressed factors train, the KL to the
dense model falls, the result reloads exactly in a fresh process, and an interrupted run resumes."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from leanformers import MPIFAConfig, WandaConfig, compress, save_compressed
from leanformers.compressors.healing import HealingConfig, distillation_loss, heal, trainable_factors
from tests.helpers import run_fresh
from tests.tiny_models import random_ids, tiny_llama


def test_distillation_loss_is_the_token_mean_kl_from_the_teacher():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    want = (
        F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
    )
    assert torch.allclose(distillation_loss(s, t), want, atol=1e-6)
    assert float(distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-7)
    hot = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none")
    assert torch.allclose(distillation_loss(s, t, 2.0), hot.sum(-1).mean() * 4, atol=1e-6)


def _compressed(seed: int = 0):
    teacher = tiny_llama(seed=seed)
    model = copy.deepcopy(teacher)
    compress(
        model,
        None,
        MPIFAConfig(density=0.5, nsamples=8, seqlen=32),
        random_ids(8, 32, seed=1),
        progress=False,
    )
    return model, teacher


def test_healing_trains_only_the_factors_lowers_the_kl_and_reloads_exactly(tmp_path):
    model, teacher = _compressed()
    factors = set(trainable_factors(model))
    assert factors and all(n.rsplit(".", 1)[1] in ("weight", "coeff", "bias") for n in factors)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    specs = copy.deepcopy(model.config.quantization_config.modules)
    cfg = HealingConfig(tokens=32 * 32, seqlen=32, batch_size=4, gradient_accumulation=2, learning_rate=1e-3)
    # 8 windows seen 4 times: the KL is measured on the first 8 training windows
    report = heal(model, teacher, None, cfg, windows=random_ids(8, 32, seed=2).repeat(4, 1))
    assert (
        report.steps == 8
        and report.tokens == 1024
        and report.trained_params == sum(p.numel() for p in trainable_factors(model).values())
    )
    assert report.kl_after < 0.95 * report.kl_before, report  # 8 small steps on a random tiny model
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= factors  # embeddings, norms, head, index buffers: bit-identical
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert model.config.quantization_config.modules == specs  # the same layers at the same ranks

    folder = save_compressed(model, None, tmp_path / "healed")
    ids = random_ids(2, 16, seed=3)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    torch.save({"ids": ids, "ref": ref}, tmp_path / "ref.pt")
    out = run_fresh(f"""
        import torch, leanformers
        from transformers import AutoModelForCausalLM
        data = torch.load({str(tmp_path / "ref.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()
        with torch.no_grad():
            print(torch.equal(model(input_ids=data["ids"]).logits, data["ref"]))
    """)
    assert out.strip().splitlines()[-1] == "True"


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    windows = random_ids(16, 32, seed=2)
    common = dict(
        tokens=512, seqlen=32, batch_size=4, gradient_accumulation=2, learning_rate=1e-3, save_steps=1
    )
    model, teacher = _compressed()
    start = copy.deepcopy(model.state_dict())
    heal(model, teacher, None, HealingConfig(**common, output_dir=str(tmp_path / "full")), windows=windows)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    # the same run killed after step 2: only its first two checkpoints exist
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for step in (3, 4):
        shutil.rmtree(tmp_path / "cut" / f"checkpoint-{step}")
    model.load_state_dict(start)
    report = heal(
        model, teacher, None, HealingConfig(**common, output_dir=str(tmp_path / "cut")), windows, resume=True
    )
    assert report.steps == 4
    assert all(torch.allclose(full[k], v, rtol=1e-5, atol=1e-6) for k, v in model.state_dict().items())


def test_refusals_name_the_problem():
    pruned = tiny_llama()
    compress(pruned, None, WandaConfig(nsamples=4, seqlen=16), random_ids(4, 16), progress=False)
    with pytest.raises(ValueError, match="2:4 pruned models are not healed"):
        heal(pruned, tiny_llama(), None, HealingConfig(tokens=64, seqlen=16), windows=random_ids(4, 16))
    with pytest.raises(ValueError, match="not a multiple of gradient_accumulation"):
        HealingConfig(batch_size=3, gradient_accumulation=2)
    with pytest.raises(ValueError, match="learning_rate must be a finite number"):
        HealingConfig(learning_rate=float("nan"))
