"""Resuming a CHTss Trainer run from whatever folder the Trainer resumed from (issue 7).

A checkpoint copied or moved elsewhere, resumed with another ``output_dir``, must continue with the
masks and schedule of the uninterrupted run; a folder without (or with foreign) masks is an error.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from leanformers.chts import CHTssCallback, CHTssConfig
from leanformers.chts.masks import pack_mask, unpack_mask
from leanformers.training import load_state, save_state
from tests.helpers import SeededTokens
from tests.tiny_models import tiny_llama

CFG = dict(final_density=0.3, update_interval=2, zeta=0.2)  # 12 steps: updates after steps 2, 4, 6, 8
STEPS = 12


class MaskRecorder(TrainerCallback):
    """Copies the masks after every optimizer step (runs after CHTssCallback)."""

    def __init__(self, chtss: CHTssCallback):
        self.chtss = chtss
        self.masks: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.masks[state.global_step] = {k: v.clone() for k, v in self.chtss.controller.masks.items()}


def run(model, out, resume=None):
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        save_strategy="steps",
        save_steps=6,
        logging_steps=1000,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    chtss = CHTssCallback(CHTssConfig(**CFG))
    recorder = MaskRecorder(chtss)
    Trainer(model=model, args=args, train_dataset=SeededTokens(), callbacks=[chtss, recorder]).train(
        resume_from_checkpoint=resume
    )
    return chtss, recorder


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    model = tiny_llama()
    chtss, recorder = run(model, out)
    assert chtss.controller.global_step == STEPS and len(chtss.controller.history) == 4
    return out, model, recorder


@pytest.mark.parametrize("output_dir", ["elsewhere", "original_with_a_stale_checkpoint"])
def test_resume_from_a_copied_checkpoint_equals_the_uninterrupted_run_at_every_step(
    uninterrupted, tmp_path, output_dir
):
    # Issue 7 acceptance 4: train 6 steps, copy checkpoint-6 to another folder, resume from the copy.
    original, full, recorder_full = uninterrupted
    copy = tmp_path / "moved" / "ckpt"
    shutil.copytree(original / "checkpoint-6", copy)
    if output_dir == "elsewhere":
        out = tmp_path / "new_run"
    else:
        # output_dir/checkpoint-6 holds masks of another run: only the folder resumed from counts.
        out = tmp_path / "stale_run"
        tensors, meta = load_state(copy, "chtss")
        shapes = meta["shapes"]
        foreign = {k: pack_mask(unpack_mask(v, tuple(shapes[k])).roll(1, 1)) for k, v in tensors.items()}
        save_state(out / "checkpoint-6", "chtss", foreign, meta)
    resumed = tiny_llama(seed=5)  # different initial weights: everything must come from the copy
    chtss, recorder = run(resumed, out, resume=str(copy))
    assert chtss.controller.global_step == STEPS and chtss.controller.history  # update at step 8 happened
    assert sorted(recorder.masks) == list(range(7, STEPS + 1))
    for step, masks in recorder.masks.items():
        for name, mask in masks.items():
            assert torch.equal(mask, recorder_full.masks[step][name]), (step, name)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_resume_from_a_copy_without_chtss_state_raises(uninterrupted, tmp_path):
    original, _, _ = uninterrupted
    copy = tmp_path / "ckpt"
    shutil.copytree(original / "checkpoint-6", copy)
    shutil.rmtree(copy / "leanformers")  # e.g. copied without the subfolder
    with pytest.raises(FileNotFoundError, match=r"resumes from .*ckpt but it holds no CHTss state"):
        run(tiny_llama(), tmp_path / "out", resume=str(copy))


def test_resume_with_masks_of_another_run_raises(uninterrupted, tmp_path):
    original, _, _ = uninterrupted
    copy = tmp_path / "ckpt"
    shutil.copytree(original / "checkpoint-6", copy)
    tensors, meta = load_state(copy, "chtss")
    shapes = meta["shapes"]
    save_state(
        copy,
        "chtss",
        {k: pack_mask(unpack_mask(v, tuple(shapes[k])).roll(1, 1)) for k, v in tensors.items()},
        meta,
    )
    with pytest.raises(ValueError, match="non-zero entries outside the checkpoint's CHTss masks"):
        run(tiny_llama(), tmp_path / "out", resume=str(copy))
