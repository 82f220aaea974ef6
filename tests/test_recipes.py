"""The shared recipe layer (leanformers.recipes) and what the entry points derive from it."""

from __future__ import annotations

import pytest

from leanformers import recipes


def test_overrides_are_typed_dotted_and_applied_in_order(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {sizes: [784, 10]}\ntraining: {epochs: 3}\n")
    recipe = recipes.load_recipe(
        path,
        [
            "training.epochs=5",
            "training.lr=0.1",
            "model.sizes=[784, 48, 10]",
            "method.chts.x=null",
            "training.epochs=7",
        ],
    )
    assert recipe == {
        "model": {"sizes": [784, 48, 10]},
        "training": {"epochs": 7, "lr": 0.1},
        "method": {"chts": {"x": None}},
    }


def test_a_dict_source_is_copied_not_changed():
    source = {"training": {"epochs": 1}}
    recipes.load_recipe(source, ["training.epochs=2"])
    assert source == {"training": {"epochs": 1}}


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"unknown recipe sections \['extra'\]; use model, method, training"):
        recipes.load_recipe({"model": {}, "extra": 1}, sections=("model", "method", "training"))
    with pytest.raises(ValueError, match="the recipe has no 'training' section"):
        recipes.load_recipe({"model": {}}, required=("model", "training"))
    with pytest.raises(ValueError, match="--set expects key.sub=value, got 'training.epochs'"):
        recipes.load_recipe({}, ["training.epochs"])
    with pytest.raises(ValueError, match="'epochs' is not a section"):
        recipes.load_recipe({"training": {"epochs": 1}}, ["training.epochs.x=2"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        recipes.load_recipe(tmp_path / "nope.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        recipes.load_recipe(listing)


def test_train_methods_are_the_chtss_presets_plus_dense_lora_sst():
    from leanformers.chts.config import METHOD_PRESETS
    from leanformers.recipes.methods import METHODS

    assert set(METHODS) == set(METHOD_PRESETS) | {"dense", "lora", "sst"}
    assert {"chtss_official_llm", "chts_official_mlp", "cht_official", "static"} <= set(METHODS)


def test_field_docs_reads_the_attributes_section():
    class Settings:
        """Some settings.

        Attributes:
            rate: the rate, in (0, 1].
            width, height: size of the
                window in pixels.
            mode: "a" or "b".

        Notes:
            ignored: not an attribute.
        """

    assert recipes.field_docs(Settings) == {
        "rate": "the rate, in (0, 1].",
        "width": "size of the window in pixels.",
        "height": "size of the window in pixels.",
        "mode": '"a" or "b".',
    }
    assert recipes.field_docs(type("NoDoc", (), {})) == {}


TRAINING_RECIPES = [
    "chtss_llama130m.yaml",
    "chtss_official_llama60m.yaml",
    "chtss_tiny_cpu.yaml",
    "classification_tiny_cpu.yaml",
    "mt_multi30k.yaml",
    "sst_llama130m.yaml",
    "sst_tiny_cpu.yaml",
    "translation_tiny_cpu.yaml",
]


@pytest.mark.parametrize("name", TRAINING_RECIPES)
def test_every_shipped_training_recipe_passes_the_checks(name, repo_root):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # chtss_official_llm warns that it misses its final density
        recipe = recipes.load_training_recipe(repo_root / "recipes" / name)
    assert {"model", "data", "training"} <= set(recipe)


def test_floats_yaml_reads_as_strings_are_numbers_and_types_are_checked():
    from leanformers.recipes.checks import RecipeError, check_value

    assert check_value("training.learning_rate", "3e-4", float) == 3e-4  # YAML 1.1 reads 3e-4 as a string
    assert check_value("training.max_steps", 5, int) == 5
    assert check_value("method.chtss.density_end", None, float | None) is None
    with pytest.raises(RecipeError, match=r"^training.max_steps=True: expected an integer$"):
        check_value("training.max_steps", True, int)
    with pytest.raises(RecipeError, match=r"^training.learning_rate='fast': expected a number$"):
        check_value("training.learning_rate", "fast", float)
