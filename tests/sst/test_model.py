"""SSTModel / PEFT integration: registration, exact init/reload/merge, parameter counts, errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaForCausalLM

import leanformers
from leanformers.sst import SSTConfig, SSTController, SSTLinear
from leanformers.sst.model import non_sst_trainable_names
from tests.helpers import run_fresh
from tests.tiny_models import llama_config, random_ids, tiny_bert, tiny_gpt2, tiny_llama

TRAIN_AND_SAVE = """
import json, sys, torch
import leanformers
from peft import get_peft_model
from tiny_models import tiny_llama, random_ids
out = sys.argv[1] if len(sys.argv) > 1 else {folder!r}
model = tiny_llama(seed=0)
ids = random_ids(2, 16, seed=1)
dense = model(ids).logits
peft_model = get_peft_model(model, leanformers.SSTConfig(r=8, steps_per_iteration=2, warmup_steps_per_iteration=1))
init_diff = (peft_model(ids).logits - dense).abs().max().item()
optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
controller = leanformers.SSTController(peft_model, optimizer)
for _ in range(7):
    peft_model(ids, labels=ids).loss.backward()
    optimizer.step(); optimizer.zero_grad(); controller.step(optimizer)
peft_model.eval()
with torch.no_grad():
    logits = peft_model(ids).logits
peft_model.save_pretrained(out)
torch.save(logits, out + "/logits.pt")
print(json.dumps({{"init_diff": init_diff, "moved": (logits - dense).abs().max().item()}}))
"""

RELOAD = """
import json, torch
import leanformers
import leanformers.sst.layer as layer_mod
from peft import PeftModel
from tiny_models import tiny_llama, random_ids
def no_svd(*a, **k):
    raise AssertionError("an SVD was computed on reload")
layer_mod.thin_svd = no_svd
ids = random_ids(2, 16, seed=1)
base = tiny_llama(seed=123)  # different base weights: nothing may be taken from them
model = PeftModel.from_pretrained(base, {folder!r})
with torch.no_grad():
    logits = model(ids).logits
saved = torch.load({folder!r} + "/logits.pt")
merged = model.merge_and_unload()
with torch.no_grad():
    merged_logits = merged(ids).logits
print(json.dumps({{
    "reload_equal": bool(torch.equal(logits, saved)),
    "merged_diff": (merged_logits - saved).abs().max().item(),
    "merged_type": type(merged.model.layers[0].self_attn.q_proj).__name__,
}}))
"""


@pytest.mark.integration
def test_fresh_process_registration_init_reload_and_merge(tmp_path):
    """Acceptance 1: exact at init, exact reload in another fresh process, merge within 1e-5."""
    folder = str(tmp_path / "adapter")
    first = json.loads(run_fresh(TRAIN_AND_SAVE.format(folder=folder)).strip().splitlines()[-1])
    assert first["init_diff"] <= 1e-5
    assert first["moved"] > 1e-3  # training changed the model, so the reload check means something
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"].startswith("SST") and "import leanformers" in config["peft_type"]
    assert config["init_weights"] is False and config["saved_format"] == "full"  # pretraining mode: full
    second = json.loads(run_fresh(RELOAD.format(folder=folder)).strip().splitlines()[-1])
    assert second["reload_equal"]
    assert second["merged_diff"] <= 1e-5
    assert second["merged_type"] == "Linear"


def test_registration_extends_peft_type():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    assert PeftType("SST") is PeftType.SST and "SST" in [t.value for t in PeftType]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SST] is SSTConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SST"].__name__ == "SSTModel"
    leanformers.sst.register_sst()  # idempotent


def test_adapter_state_is_complete_and_frees_dense_weights(tmp_path):
    model = tiny_llama()
    n_dense = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, SSTConfig(r=8))
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, SSTLinear) and q.base_layer.weight.numel() == 0
    peft_model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    for name in ("sst_U", "sst_Vh", "sst_S", "sst_U_active", "sst_Vh_active", "sst_index", "sst_counters"):
        assert f"{layer}.{name}" in saved, name
    # pretraining mode: embeddings, norms and head are part of the adapter (no modules_to_save copies)
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
    ):
        assert f"base_model.model.{name}" in saved, name
    n_params_now = sum(p.numel() for p in peft_model.parameters())
    assert n_params_now < n_dense  # dense weights freed; embeddings not duplicated


def test_qwen2_biases_of_targeted_layers_are_saved(tmp_path):
    from tests.tiny_models import tiny_qwen2

    ids = random_ids()
    peft_model = get_peft_model(tiny_qwen2(), SSTConfig(r=4, mode="finetune"))
    with torch.no_grad():
        peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias.add_(1.0)
        logits = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_qwen2(seed=0), tmp_path)  # finetune: same base
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


def _count_sst(r: int, m: int, n: int) -> int:
    return r * (m + n) + min(m, n)


def test_trainable_parameter_count_per_layer():
    peft_model = get_peft_model(tiny_llama(), SSTConfig(r=8, mode="finetune"))
    trainable = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    expected = 0
    for module in peft_model.modules():
        if isinstance(module, SSTLinear):
            expected += _count_sst(8, module.out_features, module.in_features)
    assert sum(trainable.values()) == expected
    # finetune mode freezes everything else
    assert all(".sst_" in n for n in trainable)


def test_llama_1b_on_meta_counts_18_7_percent(monkeypatch):
    """Acceptance 4: LLaMA-1.3B (paper config) at r=128 with embeddings and head trained: 18.7 %."""
    import leanformers.sst.layer as layer_mod

    monkeypatch.setattr(layer_mod, "thin_svd", lambda w: (_ for _ in ()).throw(AssertionError("SVD on meta")))
    cfg = llama_config(2048, 5461, 24, 32, vocab=32000, max_positions=2048, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    n_dense = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, SSTConfig(r=128))
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    per_layer = (
        4 * _count_sst(128, 2048, 2048) + 2 * _count_sst(128, 5461, 2048) + _count_sst(128, 2048, 5461)
    )
    non_linear = 2 * 32000 * 2048 + (2 * 24 + 1) * 2048
    assert n_trainable == 24 * per_layer + non_linear
    assert round(100 * n_trainable / n_dense, 1) == 18.7


def test_gpt2_conv1d_exact_train_and_merge():
    model = tiny_gpt2()
    ids = random_ids()
    with torch.no_grad():
        dense = model(ids).logits
    peft_model = get_peft_model(model, SSTConfig(r=4, steps_per_iteration=2, warmup_steps_per_iteration=0))
    layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    assert (
        isinstance(layer, SSTLinear)
        and layer.is_conv1d
        and (layer.out_features, layer.in_features) == (192, 64)
    )
    with torch.no_grad():
        assert (peft_model(ids).logits - dense).abs().max() <= 1e-5
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    controller = SSTController(peft_model, optimizer)
    for _ in range(4):
        peft_model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.step(optimizer)
    with torch.no_grad():
        trained = peft_model(ids).logits
    assert (trained - dense).abs().max() > 1e-3
    merged = peft_model.merge_and_unload()
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    with torch.no_grad():
        assert (merged(ids).logits - trained).abs().max() <= 1e-5


def test_bert_encoder_works():
    model = tiny_bert()
    ids = random_ids()
    with torch.no_grad():
        dense = model(ids).last_hidden_state
    peft_model = get_peft_model(model, SSTConfig(r=4, mode="finetune", train_modules=["embeddings"]))
    with torch.no_grad():
        assert (peft_model(ids).last_hidden_state - dense).abs().max() <= 1e-5
    names = non_sst_trainable_names(peft_model, peft_model.peft_config["default"])
    assert names and all("embeddings" in n for n in names)
    peft_model(ids).last_hidden_state.pow(2).mean().backward()
    assert peft_model.base_model.model.embeddings.word_embeddings.weight.grad is not None
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        assert (merged(ids).last_hidden_state - dense).abs().max() <= 1e-5


def test_error_no_module_targeted():
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError

    with pytest.raises(NoMatchingPeftModuleError, match="not found in the base model"):
        get_peft_model(tiny_llama(), SSTConfig(r=4, target_modules=["does_not_exist"]))


def test_error_rank_too_large():
    with pytest.raises(ValueError, match=r"r=40 is larger than min\(out, in\) = 32 .*k_proj.*rank_pattern"):
        get_peft_model(tiny_llama(), SSTConfig(r=40))


def test_error_second_adapter_and_unload_and_disable():
    peft_model = get_peft_model(tiny_llama(), SSTConfig(r=4))
    with pytest.raises(ValueError, match="one adapter per model"):
        peft_model.add_adapter("other", SSTConfig(r=4))
    with pytest.raises(RuntimeError, match="cannot be restored; use merge_and_unload"):
        peft_model.unload()
    with pytest.raises(RuntimeError, match="cannot be disabled"), peft_model.disable_adapter():
        pass


def test_error_forward_before_loading_factors():
    peft_model = get_peft_model(tiny_llama(), SSTConfig(r=4, init_weights=False))
    with pytest.raises(RuntimeError, match="have not been loaded: use PeftModel.from_pretrained"):
        peft_model(random_ids())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "SSTConfig.r must be an integer >= 1"),
        ({"sampling": "random"}, "SSTConfig.sampling must be one of"),
        ({"magnitude_mix": 1.5}, r"magnitude_mix must be in \[0, 1\]"),
        ({"mode": "train"}, "SSTConfig.mode must be one of 'pretrain' or 'finetune', got 'train'"),
        ({"save_format": "small"}, "SSTConfig.save_format must be one of 'auto', 'compact' or 'full'"),
        (
            {"steps_per_iteration": 10, "warmup_steps_per_iteration": 10},
            "must be smaller than steps_per_iteration",
        ),
        ({"train_modules": ["embed_tokens"]}, "train_modules only applies to mode='finetune'"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"iterations_per_round": 0}, "iterations_per_round must be an integer >= 1"),
    ],
)
def test_config_validation_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SSTConfig(**kwargs)


def test_rank_pattern_and_exclude_modules():
    peft_model = get_peft_model(
        tiny_llama(), SSTConfig(r=8, rank_pattern={"down_proj": 4}, exclude_modules=["o_proj"])
    )
    layers = peft_model.base_model.model.model.layers
    assert layers[0].mlp.down_proj.sst_settings["default"]["r"] == 4
    assert layers[0].mlp.up_proj.sst_settings["default"]["r"] == 8
    assert not isinstance(layers[0].self_attn.o_proj, SSTLinear)


def test_bfloat16_frozen_factors_train_resvd_and_reload(tmp_path):
    ids = random_ids()
    model = tiny_llama()
    with torch.no_grad():
        dense = model(ids).logits
    cfg = SSTConfig(
        r=8,
        steps_per_iteration=2,
        warmup_steps_per_iteration=1,
        iterations_per_round=1,
        frozen_factor_dtype="bfloat16",
    )
    peft_model = get_peft_model(model, cfg)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.sst_U["default"].dtype == torch.bfloat16 and layer.sst_S["default"].dtype == torch.float32
    with torch.no_grad():
        assert (peft_model(ids).logits - dense).abs().max() < 0.05  # bf16 storage of the non-active vectors
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    controller = SSTController(peft_model, optimizer)
    for _ in range(4):
        peft_model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.step(optimizer)
    assert int(layer.sst_counters["default"][1]) == 2
    with torch.no_grad():
        logits = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=4), tmp_path)
    assert reloaded.base_model.model.model.layers[0].self_attn.q_proj.sst_U["default"].dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


def test_pretrain_mode_on_a_pretrained_model_warns_once_naming_finetune(tmp_path):
    import warnings

    tiny_llama().save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path), SSTConfig(r=4))
    hits = [str(w.message) for w in caught if "mode='pretrain'" in str(w.message)]
    assert len(hits) == 1 and "mode='finetune'" in hits[0] and str(tmp_path) in hits[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path), SSTConfig(r=4, mode="finetune"))
        get_peft_model(tiny_llama(), SSTConfig(r=4))  # built from a config: a pretraining run, no warning
    assert not [w for w in caught if "mode='pretrain'" in str(w.message)]
