"""leanformers-train methods chts / chtss / set / rigl on the tiny CPU recipe."""

from __future__ import annotations

import pytest
import torch

from leanformers.chts import load_masks
from leanformers.chts.topology import link_count
from leanformers.recipes import run
from leanformers.recipes.methods import METHODS
from tests.conftest import REPO_ROOT


def test_methods_are_registered():
    assert {"chts", "chtss", "set", "rigl"} <= set(METHODS)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["chtss", "rigl"])
def test_tiny_recipe_trains_to_the_final_density(tmp_path, shared_data, method):
    recipe = str(REPO_ROOT / "recipes" / "chtss_tiny_cpu.yaml")
    overrides = [
        f"training.output_dir={tmp_path}",
        "training.max_steps=12",
        f"method.name={method}",
        "data.max_train_tokens=20000",
    ]
    if method != "chtss":
        overrides.append(f"method.{method}.final_density=0.3")
        overrides.append(f"method.{method}.update_interval=4")
    out = run(recipe, overrides)
    callback = next(
        cb for cb in out["trainer"].callback_handler.callbacks if type(cb).__name__ == "CHTssCallback"
    )
    sched = callback.controller
    assert sched.config.method == method and len(sched.history) == 2
    for layer in sched.layers:
        assert int(layer.mask.sum()) == link_count(layer.shape, 0.3)
    masks = load_masks(tmp_path)
    final = out["model"]
    for name, mask in masks.items():
        assert (final.get_submodule(name).weight[~mask] == 0).all()
    assert torch.isfinite(torch.tensor(out["metrics"]["eval_loss"]))


def test_unknown_option_fails_clearly(tmp_path):
    with pytest.raises(
        ValueError, match=r"method.chtss.densiti: unknown key; did you mean .*\? \(valid: .*final_density"
    ):
        run(
            str(REPO_ROOT / "recipes" / "chtss_tiny_cpu.yaml"),
            [f"training.output_dir={tmp_path}", "method.chtss.densiti=0.3"],
        )
