"""SST across the PEFT surface: classifier heads (task_type / modules_to_save), honest parameter counts,
and every adapter operation either works or raises a clear error (never a bare KeyError, never a no-op)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from leanformers.sst import SSTCallback, SSTConfig, SSTLinear
from tests.sst.helpers import RandomClassification, run_fresh, tiny_bert_classifier
from tests.tiny_models import random_ids, tiny_llama

RELOAD_CLASSIFIER = """
import json, torch
import leanformers
from peft import PeftModel
from sst.helpers import tiny_bert_classifier
base = tiny_bert_classifier(seed=0)  # same seed/config as the trained model's base: a random head again
model = PeftModel.from_pretrained(base, {folder!r}).eval()
ids = torch.load({folder!r} + "/ids.pt")
with torch.no_grad():
    logits = model(input_ids=ids).logits
saved = torch.load({folder!r} + "/logits.pt")
print(json.dumps({{"type": type(model).__name__, "equal": bool(torch.equal(logits, saved)),
                  "diff": (logits - saved).abs().max().item()}}))
"""


def _train(model, tmp_path, steps: int = 6):
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        max_steps=steps,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        logging_steps=100,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomClassification(), callbacks=[SSTCallback()])
    trainer.train()
    return trainer


@pytest.mark.integration
@pytest.mark.parametrize("how", ["task_type", "modules_to_save"])
def test_classifier_head_trains_saves_and_reloads_in_a_fresh_process(tmp_path, how, capsys):
    """Issue 7 acceptance 3: the SEQ_CLS head trains, is saved, reloads exactly; the count is honest."""
    dense_model = tiny_bert_classifier(seed=0)
    n_dense = sum(p.numel() for p in dense_model.parameters())
    kwargs = {"task_type": "SEQ_CLS"} if how == "task_type" else {"modules_to_save": ["classifier"]}
    cfg = SSTConfig(r=4, mode="finetune", steps_per_iteration=3, warmup_steps_per_iteration=1, **kwargs)
    model = get_peft_model(dense_model, cfg)
    head_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if "classifier" in n and p.requires_grad
    }
    assert head_before, "the classifier head is not trainable"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_trainable, n_all = model.get_nb_trainable_parameters()
    assert n_all == n_dense
    assert abs(n_trainable - trainable) <= 1e-3 * trainable
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    assert f"trainable params: {trainable:,d} || all params: {n_dense:,d}" in printed

    _train(model, tmp_path)
    for name, before in head_before.items():
        after = dict(model.named_parameters())[name]
        assert not torch.equal(after.detach(), before), f"{name} did not train"

    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    from safetensors.torch import load_file

    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert any("classifier" in k for k in saved), sorted(saved)[:10]
    ids = random_ids(4, 12, seed=3)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.save(ids, folder / "ids.pt")
    torch.save(logits, folder / "logits.pt")
    report = json.loads(run_fresh(RELOAD_CLASSIFIER.format(folder=str(folder))).strip().splitlines()[-1])
    assert report["equal"], report


def test_modules_to_save_is_a_config_field():
    cfg = SSTConfig(r=4, modules_to_save=["classifier"])
    assert cfg.modules_to_save == ["classifier"]


def _dense_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_trainable_parameter_report_is_relative_to_the_dense_model(mode, capsys):
    """all = the dense model's count; trainable = S + active U/Vh + other trained params (the truth)."""
    dense = tiny_llama()
    n_dense = _dense_count(dense)
    model = get_peft_model(dense, SSTConfig(r=8, mode=mode))
    n_sst = 0
    n_other = 0
    for module in model.modules():
        if isinstance(module, SSTLinear):
            m, n = module.out_features, module.in_features
            n_sst += 8 * (m + n) + min(m, n)
    if mode == "pretrain":  # every non-linear parameter trains in place (embeddings, norms, head)
        n_other = n_dense - sum(
            mod.out_features * mod.in_features for mod in model.modules() if isinstance(mod, SSTLinear)
        )
    trainable, total = model.get_nb_trainable_parameters()
    assert total == n_dense
    assert trainable == n_sst + n_other
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    assert f"trainable%: {100 * trainable / n_dense:.4f}" in out
    expected_pct = {"pretrain": 41, "finetune": 20}[mode]
    assert round(100 * trainable / n_dense) == expected_pct


# ------------------------------------------------------------------------------------- PEFT surface
def _llama_sst():
    return get_peft_model(tiny_llama(), SSTConfig(r=4, mode="finetune"))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_delete_adapter_refuses_clearly_and_model_keeps_working():
    model = _llama_sst()
    ids = random_ids()
    before = _logits(model, ids)
    with pytest.raises(RuntimeError, match=r"SST adapter 'default' holds the weights.*merge_and_unload"):
        model.delete_adapter("default")
    assert torch.equal(_logits(model, ids), before)
    with pytest.raises(ValueError, match="does not exist"):
        model.delete_adapter("other")


def test_layer_without_active_adapter_raises_clearly():
    model = _llama_sst()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.set_adapter([])
    with pytest.raises(RuntimeError, match=r"no active SST adapter.*set_adapter\('default'\)"):
        layer(torch.randn(2, 64))


def test_merge_adapter_and_unmerge_adapter_keep_logits():
    model = _llama_sst()
    ids = random_ids()
    before = _logits(model, ids)
    model.merge_adapter()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.merged and layer.base_layer.weight.shape == (64, 64)
    assert (_logits(model, ids) - before).abs().max() <= 1e-5
    model.unmerge_adapter()
    assert not layer.merged and layer.base_layer.weight.numel() == 0
    assert torch.equal(_logits(model, ids), before)


def test_training_a_merged_adapter_warns():
    model = _llama_sst()
    model.merge_adapter()
    model.train()
    ids = random_ids()
    with pytest.warns(UserWarning, match="merged.*would not train.*unmerge_adapter"):
        model(ids, labels=ids)


def test_merge_and_unload_gives_plain_layers_with_same_logits():
    model = _llama_sst()
    ids = random_ids()
    before = _logits(model, ids)
    merged = model.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert (_logits(merged, ids) - before).abs().max() <= 1e-5


def test_unload_and_disable_adapter_raise_clearly():
    model = _llama_sst()
    with pytest.raises(RuntimeError, match="cannot be restored; use merge_and_unload"):
        model.unload()
    with pytest.raises(RuntimeError, match="cannot be disabled"), model.disable_adapter():
        pass
    ids = random_ids()
    model(ids)  # still usable: the failed disable left the adapter enabled


def test_add_adapter_refuses_and_leaves_the_model_intact():
    model = _llama_sst()
    ids = random_ids()
    before = _logits(model, ids)
    with pytest.raises(ValueError, match="one adapter per model"):
        model.add_adapter("other", SSTConfig(r=4, mode="finetune"))
    with pytest.raises(ValueError, match="different peft types"):
        model.add_adapter("extra", LoraConfig(r=2))
    assert list(model.peft_config) == ["default"]
    assert torch.equal(_logits(model, ids), before)


def test_set_adapter_existing_works_and_unknown_raises():
    model = _llama_sst()
    ids = random_ids()
    before = _logits(model, ids)
    model.set_adapter("default")
    assert torch.equal(_logits(model, ids), before)
    with pytest.raises(ValueError, match="not found"):
        model.set_adapter("other")
    assert torch.equal(_logits(model, ids), before)


def test_reloaded_adapter_is_frozen_unless_trainable(tmp_path):
    model = _llama_sst()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    trainable, total = reloaded.get_nb_trainable_parameters()
    assert trainable == 0 and total == _dense_count(tiny_llama())
