"""bench/mlp_mnist.py: the MNIST MLP training loop and its recipe runner (moved out of the library)."""

from __future__ import annotations

import json

import pytest

from leanformers.chts.topology import link_count
from tests.bench.conftest import load_bench
from tests.helpers import REPO_ROOT


def test_the_loop_accepts_the_official_mlp_preset_with_correlated_init(shared_data):
    out = load_bench("mlp_mnist").train_mlp(
        "chts_official_mlp",
        sizes=(784, 64, 64, 10),
        epochs=2,
        n_train=320,
        final_density=0.05,
        lr_end_factor=0.01,
    )
    assert out["density_sparse_subset"] == pytest.approx(
        (link_count((64, 784), 0.05) + link_count((64, 64), 0.05) + link_count((10, 64), 0.05))
        / (64 * 784 + 64 * 64 + 10 * 64)
    )


@pytest.mark.parametrize("recipe", ["chts_official_mlp_mnist.yaml", "cht_official_mlp_mnist.yaml"])
def test_tiny_version_of_the_official_mlp_recipes_reaches_the_final_density(shared_data, recipe):
    name = recipe.replace("_mlp_mnist.yaml", "").replace("chts_official", "chts_official_mlp")
    out = load_bench("mlp_mnist").run_recipe(
        str(REPO_ROOT / "recipes" / recipe),
        [
            "model.sizes=[784, 48, 10]",
            f"method.{name}.final_density=0.05",
            f"method.{name}.targets=['^layers\\.0$']",
            "training.epochs=3",
            "training.n_train=256",
            "training.device=cpu",
        ],
    )
    assert out["method"] == name and out["updates"] == 2
    assert len(out["active_hidden_neurons"]) == 1  # the sparse hidden layer, classifier dense
    assert out["density_sparse_subset"] == link_count((48, 784), 0.05) / (48 * 784)


def test_quick_run_writes_the_result_and_refuses_to_overwrite(run_bench, shared_data):
    payload, out = run_bench("mlp_mnist")  # recipes/chts_mlp_tiny_cpu.yaml, 784-48-10 at 1 %
    result = payload["result"]
    assert json.loads(out.read_text())["result"] == result
    assert result["method"] == "chts" and payload["recipe"]["model"]["sizes"] == [784, 48, 10]
    # 1 % of each of the two targeted layers (layers.0 and the classifier layers.2)
    assert result["density_sparse_subset"] == pytest.approx(
        (link_count((48, 784), 0.01) + link_count((10, 48), 0.01)) / (48 * 784 + 10 * 48)
    )
    with pytest.raises(FileExistsError, match="no silent overwrite"):
        load_bench("mlp_mnist").main(["--quick", "--output", str(out)])


def test_unknown_section_and_the_old_library_path_are_clear_errors():
    with pytest.raises(
        ValueError, match=r"unknown MLP recipe sections \['trainig'\]; use model, method, training"
    ):
        load_bench("mlp_mnist").run_recipe({"trainig": {"epochs": 1}})
    import leanformers.chts.mlp as library_mlp

    with pytest.raises(AttributeError, match="moved to bench/mlp_mnist.py"):
        library_mlp.train_mlp  # noqa: B018


@pytest.mark.slow
def test_rows_run_every_method_and_seed_and_merge_by_method_and_seed(run_bench, shared_data):
    payload, out = run_bench("mlp_mnist", "--rows", "er_ablation", "--set", "methods=[cht_official]")
    (row,) = payload["rows"]
    assert row["method"] == "cht_official+er_init" and row["seed"] == 0
    assert row["density_sparse_subset"] == pytest.approx(0.01, rel=0.05)  # ER init, 1 % of the hidden layers
    again, _ = run_bench(
        "mlp_mnist", "--rows", "er_ablation", "--set", "seeds=2", "methods=[cht_official]", "--merge"
    )
    assert [(r["method"], r["seed"]) for r in again["rows"]] == [
        ("cht_official+er_init", 0),
        ("cht_official+er_init", 1),
    ]
    same = {k: v for k, v in row.items() if k != "seconds"}  # seed 0 rerun: the same numbers
    assert {k: v for k, v in again["rows"][0].items() if k != "seconds"} == same
    assert json.loads(out.read_text())["rows"] == again["rows"]
