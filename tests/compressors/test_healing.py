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
    assert report.kl_after < 0.95 * report.kl_before and report.kept, report  # 8 small steps, random tiny
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


def test_a_run_that_raises_the_kl_is_discarded_and_said(caplog):
    # lr 1.0 wrecks the factors in one step: the KL on the training windows rises, so the model must come
    # back exactly as it was before healing, the report must say so, and a warning must name it
    model, teacher = _compressed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = HealingConfig(tokens=8 * 32, seqlen=32, batch_size=4, gradient_accumulation=2, learning_rate=1.0)
    with caplog.at_level("WARNING", logger="leanformers.compressors.healing"):
        report = heal(model, teacher, None, cfg, windows=random_ids(8, 32, seed=2))
    assert report.kl_after > report.kl_before and report.kept is False, report
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "healing discarded" in caplog.text and "learning rate 1" in caplog.text


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


def _tiny_with_tokenizer(tokenizer):
    from transformers import LlamaForCausalLM

    from tests.tiny_models import llama_config

    torch.manual_seed(0)
    cfg = llama_config(64, 96, 2, heads=4, kv_heads=2, vocab=len(tokenizer), tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def test_the_distill_recipe_trains_only_the_factors_and_its_final_folder_reloads_exactly(
    tmp_path, shared_data
):
    """`leanformers-train` with `task: distill` (issue 20): a PIFA folder and its dense teacher; the Trainer
    changes only the compressed factors, lowers the KL, and `final/` is a PIFA checkpoint at the same ranks
    whose logits a fresh process reproduces exactly."""
    from leanformers.hub import smollm2_135m
    from leanformers.recipes.data import build_tokenizer
    from leanformers.recipes.runner import run

    tok = build_tokenizer(str(smollm2_135m()))
    teacher = _tiny_with_tokenizer(tok)
    teacher.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    student = copy.deepcopy(teacher)
    compress(
        student,
        tok,
        MPIFAConfig(density=0.5, nsamples=8, seqlen=32),
        random_ids(8, 32, seed=1),
        progress=False,
    )
    save_compressed(student, tok, tmp_path / "pifa")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    factors = set(trainable_factors(student))
    text = str(shared_data / "wikitext-2-v1-valid.txt")
    recipe = {
        "task": "distill",
        "model": {"pretrained": str(tmp_path / "pifa")},
        "tokenizer": str(tmp_path / "pifa"),
        "data": {"teacher": str(tmp_path / "dense"), "text": text, "tokens": 16 * 32, "seqlen": 32},
        "training": {
            "output_dir": str(tmp_path / "run"),
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "use_cpu": True,
            "logging_steps": 1,
            "disable_tqdm": True,
        },
    }
    result = run(recipe)
    model, metrics = result["model"], result["metrics"]
    assert metrics["trainable_parameters"] == sum(p.numel() for p in trainable_factors(model).values())
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= factors
    assert result["trainer"].state.global_step == 4  # 16 windows, batches of 4, one pass
    seen = result["trainer"].train_dataset.windows[:8]  # KL(dense || student) on the training text
    with torch.no_grad():
        target = teacher(input_ids=seen).logits
        kl_before = float(distillation_loss(student(input_ids=seen).logits, target))
        kl_after = float(distillation_loss(model.eval()(input_ids=seen).logits, target))
    assert kl_after < 0.9 * kl_before, (kl_before, kl_after)

    final = tmp_path / "run" / "final"
    ids = random_ids(2, 16, seed=3)
    with torch.no_grad():
        ref = model.eval()(input_ids=ids).logits
    torch.save({"ids": ids, "ref": ref}, tmp_path / "ref.pt")
    out = run_fresh(f"""
        import torch, leanformers
        from transformers import AutoModelForCausalLM
        data = torch.load({str(tmp_path / "ref.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(final)!r}).eval()
        same_ranks = model.config.quantization_config.modules == {student.config.quantization_config.modules!r}
        with torch.no_grad():
            print(same_ranks, torch.equal(model(input_ids=data["ids"]).logits, data["ref"]))
    """)
    assert out.strip().splitlines()[-1] == "True True"


def test_the_distill_recipe_refuses_what_it_cannot_do(tmp_path):
    from leanformers.recipes.checks import RecipeError
    from leanformers.recipes.runner import run

    teacher = tiny_llama()
    teacher.save_pretrained(tmp_path / "dense")
    base = {
        "task": "distill",
        "model": {"pretrained": str(tmp_path / "dense")},
        "training": {"output_dir": str(tmp_path)},
    }
    with pytest.raises(RecipeError, match="needs the models' own tokenizer"):
        run({**base, "data": {"teacher": str(tmp_path / "dense")}})
    with pytest.raises(RecipeError, match="data needs a 'teacher' source"):
        run({**base, "tokenizer": "smollm2", "data": {"text": "self"}})
    with pytest.raises(RecipeError, match="compress it with mpifa"):
        run({**base, "tokenizer": "smollm2", "data": {"teacher": str(tmp_path / "dense")}})


def _distillation_trainer(model, teacher, dataset, tmp_path):
    from transformers import TrainingArguments

    from leanformers.compressors.healing import DistillationTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        num_train_epochs=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    return DistillationTrainer(model=model, args=args, train_dataset=dataset, teacher=teacher)


def test_the_guard_reads_a_datasets_dataset_whose_examples_are_lists(tmp_path):
    # a `datasets.Dataset` returns lists of ids, not tensors: the guard measures them like TokenWindows'
    import datasets

    from leanformers.compressors.healing import freeze_all_but_factors

    model, teacher = _compressed()
    freeze_all_but_factors(model)
    ids = random_ids(8, 32, seed=2)
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    assert isinstance(dataset[0]["input_ids"], list)
    trainer = _distillation_trainer(model, teacher, dataset, tmp_path)
    metrics = trainer.train().metrics
    assert metrics["distill_kept"] and metrics["distill_kl_after"] < metrics["distill_kl_before"], metrics


def test_the_guard_refuses_examples_of_different_lengths_and_names_the_way_out(tmp_path):
    import datasets

    model, teacher = _compressed()
    dataset = datasets.Dataset.from_dict({"input_ids": [list(range(1, 33)), list(range(1, 17))]})
    trainer = _distillation_trainer(model, teacher, dataset, tmp_path)
    with pytest.raises(ValueError, match=r"shapes \[\(16,\), \(32,\)\].*discard_if_worse=False"):
        trainer.train()


def test_an_empty_training_dataset_is_refused_by_name(tmp_path):
    import datasets

    model, teacher = _compressed()
    dataset = datasets.Dataset.from_dict({"input_ids": []})
    trainer = _distillation_trainer(model, teacher, dataset, tmp_path)
    with pytest.raises(ValueError, match="training dataset is empty"):
        trainer.train()
