"""Masks travel with the model (issue 22): save_pretrained / save_model write them, load_masks and a
new run on the reloaded model find them; deep copies and pickles of the model stay safe."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from leanformers.chts import CHTssCallback, CHTssConfig, CHTssController, load_masks
from leanformers.chts.topology import link_count
from tests.helpers import SeededTokens
from tests.tiny_models import tiny_llama

CFG = dict(final_density=0.3, initial_density=0.5, update_interval=2)


class MasksAtStart(TrainerCallback):
    """Records the CHTss masks right after the controller was built (runs after CHTssCallback)."""

    def __init__(self, chtss: CHTssCallback):
        self.chtss, self.masks = chtss, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.masks = {k: v.clone() for k, v in self.chtss.controller.masks.items()}


def _trainer(model, out, cfg: CHTssConfig, steps: int = 8):
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        save_strategy="no",
        logging_steps=1000,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    chtss = CHTssCallback(cfg)
    start = MasksAtStart(chtss)
    trainer = Trainer(model=model, args=args, train_dataset=SeededTokens(), callbacks=[chtss, start])
    return trainer, chtss, start


@pytest.fixture()
def saved(tmp_path):
    """A CHTss run (50 % -> 30 %) saved with trainer.save_model; its final masks."""
    trainer, chtss, _ = _trainer(tiny_llama(), tmp_path / "run", CHTssConfig(**CFG))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    return tmp_path / "final", {k: v.clone() for k, v in chtss.controller.masks.items()}


def test_save_model_writes_the_masks_next_to_the_weights(saved):
    folder, masks = saved
    assert (folder / "model.safetensors").is_file()
    assert (folder / "leanformers" / "chtss_masks.safetensors").is_file()
    found = load_masks(folder)
    assert found.keys() == masks.keys() and all(torch.equal(found[k], masks[k]) for k in masks)


def test_a_new_run_on_the_reloaded_model_continues_from_its_masks(saved, tmp_path, caplog):
    folder, masks = saved
    model = AutoModelForCausalLM.from_pretrained(folder)
    with caplog.at_level(logging.WARNING, logger="leanformers"):
        trainer, chtss, start = _trainer(model, tmp_path / "more", CHTssConfig(**CFG))
        trainer.train()
    assert all(torch.equal(start.masks[k], masks[k]) for k in masks)  # the saved topology, not a new draw
    # the same config (50 % -> 30 %) continues at the saved 30 %: said once, then kept exactly
    said = [r.getMessage() for r in caplog.records if "continues from the masks saved" in r.getMessage()]
    assert len(said) == 1 and "initial_density=0.5" in said[0] and "masks_from_model=False" in said[0]
    assert chtss.controller.config.initial_density == 0.3 and not chtss.controller.config.is_chtss
    for layer in chtss.controller.layers:
        assert int(layer.mask.sum()) == link_count(layer.shape, 0.3)
        assert (layer.logical(layer.weight.data)[~layer.mask] == 0).all()


def test_saved_masks_outside_the_config_range_fail_and_can_be_declined(saved, tmp_path):
    folder, masks = saved
    lower = CHTssConfig(final_density=0.1, initial_density=0.2, update_interval=2)
    with pytest.raises(
        ValueError, match=r"hold \d+ links, but the config starts at .*masks_from_model=False"
    ):
        CHTssController(AutoModelForCausalLM.from_pretrained(folder), None, lower, total_steps=8)
    fresh = CHTssController(
        AutoModelForCausalLM.from_pretrained(folder),
        None,
        CHTssConfig(**CFG, masks_from_model=False),
        total_steps=8,
    )
    assert any(not torch.equal(fresh.masks[k], masks[k]) for k in masks)  # a new draw at 50 %


def test_copies_and_pickles_of_the_model_stay_safe(tmp_path, caplog):
    model = tiny_llama()
    controller = CHTssController(model, None, CHTssConfig(**CFG), total_steps=8)
    twin = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="leanformers"):
        twin.save_pretrained(tmp_path / "twin")  # the copy's own weights, no masks of the original
    assert "copy of a CHTss-trained model writes no CHTss masks" in caplog.text
    assert not (tmp_path / "twin" / "leanformers").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "twin")
    for name, p in twin.named_parameters():
        assert torch.equal(p, reloaded.get_parameter(name)), name
    pickle.loads(pickle.dumps(model)).save_pretrained(tmp_path / "unpickled")
    controller.remove()  # the hook goes with the controller
    assert "save_pretrained" not in vars(model)
