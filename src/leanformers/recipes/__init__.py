"""Recipes: YAML files that say what to train and how (``leanformers-train RECIPE.yaml``).

Layers (each module imports only the ones above it):

- ``loading``: YAML, ``--set key.sub=value`` overrides, top-level sections (shared with
  ``mpifa-compress --config`` and bench/mlp_mnist.py);
- ``checks``: :class:`RecipeError` (one line: the key and the fix), "did you mean", value types;
- ``data`` / ``models``: tokenizers, datasets and models built from recipe sections;
- ``methods``: the method registry (dense, lora, sst, every CHTss preset) and ``method.name`` switching;
- ``tasks``: the task registry (causal_lm, translation, classification): a new task is one entry;
- ``schema``: every section checked up front; :func:`load_training_recipe`;
- ``runner``: :func:`run` (HF Trainer + accelerate); ``cli``: ``leanformers-train``.
"""

from leanformers.recipes.checks import RecipeError
from leanformers.recipes.loading import (
    apply_overrides,
    check_keys,
    field_docs,
    load_recipe,
    read_yaml,
    set_dotted,
)
from leanformers.recipes.runner import run
from leanformers.recipes.schema import check_recipe, load_training_recipe

__all__ = [
    "RecipeError",
    "apply_overrides",
    "check_keys",
    "check_recipe",
    "field_docs",
    "load_recipe",
    "load_training_recipe",
    "read_yaml",
    "run",
    "set_dotted",
]
