"""Compact SST adapters (issue 22): a fine-tuned adapter stores at most the bytes of the targeted base weights,
reloads exactly onto its base model (fresh process), refuses another base, and Trainer checkpoints stay full."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from leanformers.sst import SSTCallback, SSTConfig, SSTController, SSTLinear
from leanformers.sst.config import SAVED_PEFT_TYPE
from tests.helpers import RandomTokens, cpu_training_args, run_fresh
from tests.tiny_models import random_ids, tiny_gpt2, tiny_llama

FT = dict(r=4, mode="finetune", steps_per_iteration=2, warmup_steps_per_iteration=0)


def _layers(model) -> dict[str, SSTLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SSTLinear)}


def targeted_base_bytes(peft_model) -> int:
    """Bytes of the targeted modules' base parameters (weight + bias) in the base dtype."""
    total = 0
    for layer in _layers(peft_model).values():
        size = torch.empty((), dtype=layer.base_dtype).element_size()
        bias = layer.get_base_layer().bias
        total += size * layer.out_features * layer.in_features + (0 if bias is None else bias.numel() * size)
    return total


def payload_bytes(path) -> int:
    """Tensor bytes of a safetensors file: its size less the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


def finetune(model, steps: int = 6, **options):
    """``steps`` AdamW steps of SST fine-tuning in a custom loop (3 iterations at steps_per_iteration=2)."""
    peft_model = get_peft_model(model, SSTConfig(**{**FT, **options}))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    controller = SSTController(peft_model, optimizer)
    ids = random_ids(4, 16, seed=1)
    for _ in range(steps):
        peft_model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.step(optimizer)
    return peft_model.eval()


def save_with_logits(peft_model, folder) -> torch.Tensor:
    peft_model.save_pretrained(folder)
    with torch.no_grad():
        logits = peft_model(random_ids(2, 16, seed=5)).logits
    save_file({"logits": logits.contiguous()}, str(folder / "logits.safetensors"))
    return logits


RELOAD = """
import json, torch
from peft import PeftModel
from safetensors.torch import load_file
from tests.tiny_models import tiny_gpt2, tiny_llama, random_ids
report = {{}}
try:  # a user who forgot `import leanformers`: peft's KeyError must name the fix
    PeftModel.from_pretrained(tiny_llama(seed=0), {cases!r}[0][0])
except KeyError as exc:
    report["no_import"] = str(exc)
import leanformers
torch.set_num_threads(2)  # other thread counts than the training process: the base SVD must not change
for folder, builder in {cases!r}:
    model = PeftModel.from_pretrained({{"llama": tiny_llama, "gpt2": tiny_gpt2}}[builder](seed=0), folder)
    with torch.no_grad():
        logits = model(random_ids(2, 16, seed=5)).logits
        merged = model.merge_and_unload()(random_ids(2, 16, seed=5)).logits
    saved = load_file(folder + "/logits.safetensors")["logits"]
    report[folder] = {{"equal": bool(torch.equal(logits, saved)), "merged": (merged - saved).abs().max().item()}}
print(json.dumps(report))
"""


@pytest.mark.integration
def test_compact_adapters_are_small_and_reload_exactly_in_a_fresh_process(tmp_path, caplog):
    """Spectral entries (S + touched pairs), dense entries (after re-SVDs), bf16 factors and GPT-2 Conv1D:
    each adapter holds at most the targeted base bytes and a fresh process reloads identical logits."""
    cases = {
        "spectral": (tiny_llama, {}),
        "dense": (tiny_llama, {"iterations_per_round": 1}),  # a re-SVD every iteration: all pairs changed
        "bf16": (tiny_llama, {"frozen_factor_dtype": "bfloat16"}),
        "gpt2": (tiny_gpt2, {"iterations_per_round": 2}),  # one re-SVD at step 4: dense entries for Conv1D
    }
    reload = []
    for name, (builder, options) in cases.items():
        model = finetune(builder(seed=0), **options)
        folder = tmp_path / name
        with caplog.at_level(logging.INFO, logger="leanformers"):
            save_with_logits(model, folder)
        assert any("compact" in r.getMessage() for r in caplog.records), (
            "save_pretrained did not say what it wrote"
        )
        file = folder / "adapter_model.safetensors"
        assert payload_bytes(file) <= targeted_base_bytes(model), (name, payload_bytes(file))
        if name not in ("dense", "gpt2"):  # all-dense: exactly the base bytes plus the safetensors header
            assert file.stat().st_size <= targeted_base_bytes(model), (name, file.stat().st_size)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["saved_format"] == "compact" and config["peft_type"] == SAVED_PEFT_TYPE
        assert config["import_required"] == "leanformers"
        assert "import leanformers" in (folder / "README.md").read_text()
        keys = load_file(str(folder / "adapter_model.safetensors")).keys()
        dense = any(k.endswith(".sst_weight") for k in keys)
        assert dense == (name in ("dense", "gpt2")), (name, sorted(keys)[:12])
        assert not any(k.endswith((".sst_U", ".sst_Vh")) for k in keys)  # never the full factors
        reload.append((str(folder), "gpt2" if builder is tiny_gpt2 else "llama"))
    report = json.loads(run_fresh(RELOAD.format(cases=reload)).strip().splitlines()[-1])
    assert "import leanformers" in report["no_import"], report.get("no_import")
    for folder, _ in reload:
        assert report[folder]["equal"], (folder, report[folder])
        assert report[folder]["merged"] <= 1e-5, (folder, report[folder])


def test_spectral_reload_restores_the_complete_training_state(tmp_path):
    """Until a re-SVD the compact adapter is the whole state: U, Vh, S, active vectors, indices, counters."""
    model = finetune(tiny_llama(seed=0), steps=5)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, is_trainable=True)
    want = {k: v for k, v in model.state_dict().items() if ".sst_" in k}
    got = reloaded.state_dict()
    assert want and all(torch.equal(got[k], v) for k, v in want.items())
    touched = [m.sst_touched["default"] for m in _layers(model).values()]
    assert all(0 < int(t.sum()) < t.numel() for t in touched)  # two iterations written back, rest untouched


def test_dense_entries_reload_for_training_with_a_warning(tmp_path):
    model = finetune(tiny_llama(seed=0), iterations_per_round=1)
    logits = save_with_logits(model, tmp_path)
    with pytest.warns(UserWarning, match="training continues from the SVD of those weights"):
        trainable = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, is_trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(trainable(random_ids(2, 16, seed=5)).logits, logits, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in trainable.parameters() if p.requires_grad) > 0


def test_compact_adapter_refuses_another_base_model(tmp_path):
    finetune(tiny_llama(seed=0)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"does not match the base model .* base_model_name_or_path"):
        PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path)


def test_a_base_svd_that_differs_in_the_last_bits_warns_and_stays_close(tmp_path):
    """Another CPU / library build recomputes a slightly different SVD: not exact, said once, within 1e-4."""
    model = finetune(tiny_llama(seed=0))
    logits = save_with_logits(model, tmp_path)
    base = tiny_llama(seed=0)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(1 + 1e-7 * torch.randn_like(p))
    with pytest.warns(UserWarning, match="not bit for bit"):
        reloaded = PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(random_ids(2, 16, seed=5)).logits, logits, atol=1e-4, rtol=1e-4)


def test_save_format_overrides_and_trainer_checkpoints_stay_full(tmp_path):
    from transformers import Trainer

    full = finetune(tiny_llama(seed=0), steps=2, save_format="full")
    full.save_pretrained(tmp_path / "full")
    assert json.loads((tmp_path / "full" / "adapter_config.json").read_text())["saved_format"] == "full"
    pretrain = get_peft_model(tiny_llama(seed=0), SSTConfig(r=4, save_format="compact"))
    pretrain.save_pretrained(tmp_path / "pretrain")
    assert (
        json.loads((tmp_path / "pretrain" / "adapter_config.json").read_text())["saved_format"] == "compact"
    )

    model = get_peft_model(tiny_llama(seed=0), SSTConfig(**FT))
    args = cpu_training_args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(n=16), callbacks=[SSTCallback()])
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["saved_format"] == "full"
    assert any(k.endswith(".sst_U") for k in load_file(str(checkpoint / "adapter_model.safetensors")))
    trainer.save_model(str(tmp_path / "final"))
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["saved_format"] == "compact"


def test_adapters_saved_before_sst_touched_existed_still_load(tmp_path):
    model = finetune(tiny_llama(seed=0), steps=2, save_format="full")
    logits = save_with_logits(model, tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    state = {k: v for k, v in load_file(path).items() if not k.endswith(".sst_touched")}
    save_file(state, path)
    with pytest.warns() as record:
        reloaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)
    assert not [w for w in record if "missing adapter keys" in str(w.message)]
    with torch.no_grad():
        assert torch.equal(reloaded(random_ids(2, 16, seed=5)).logits, logits)
    assert all(
        int(m.sst_touched["default"].min()) == 1 for m in _layers(reloaded).values()
    )  # assumed changed


SMOLLM2_RELOAD = """
import json, torch
import leanformers
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.float32)
model = PeftModel.from_pretrained(base, {folder!r}).eval()
ids = load_file({folder!r} + "/probe.safetensors")
with torch.no_grad():
    logits = model(input_ids=ids["ids"]).logits
print(json.dumps({{"equal": bool(torch.equal(logits, ids["logits"])), "diff": (logits - ids["logits"]).abs().max().item()}}))
"""


@pytest.mark.slow
@pytest.mark.integration
def test_smollm2_compact_adapter_is_smaller_than_its_targets_and_reloads_exactly(smollm2_path, tmp_path):
    """SmolLM2-135M, r = 8 on the attention projections (their SVDs are the cheap ones; bench/sst_finetune.py
    measures all seven): two fine-tuning steps, a compact adapter of about LoRA's size (1/27 of the 106 MB of
    targeted float32 weights), identical logits in a fresh process."""
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    model = get_peft_model(base, SSTConfig(r=8, mode="finetune", target_modules=targets))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    controller = SSTController(model, optimizer)
    ids = random_ids(2, 12, seed=3) + 100  # inside SmolLM2's vocabulary
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.step(optimizer)
    model.eval()
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    with torch.no_grad():
        save_file(
            {"ids": ids, "logits": model(input_ids=ids).logits.contiguous()},
            str(folder / "probe.safetensors"),
        )
    size = (folder / "adapter_model.safetensors").stat().st_size
    assert size <= targeted_base_bytes(model) / 20, (size, targeted_base_bytes(model))
    report = json.loads(run_fresh(SMOLLM2_RELOAD.format(base=str(smollm2_path), folder=str(folder)), timeout=600)
                        .strip().splitlines()[-1])  # fmt: skip
    assert report["equal"], report
