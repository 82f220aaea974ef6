"""``leanformers-train RECIPE.yaml``: the console script and ``python -m leanformers.train`` (accelerate, torchrun).

The recipe layer lives in :mod:`leanformers.recipes` (schema and checks, methods, tasks, data, runner,
cli). The names this module used to hold (``run``, ``load_recipe``, ``METHODS``, ``build_model``, ...)
still resolve here, with a FutureWarning naming their new home.
"""

from __future__ import annotations

import importlib
import warnings

from leanformers.recipes.cli import main

__all__ = ["main"]

# old name -> (module, new name)
_MOVED = {
    "run": ("leanformers.recipes.runner", "run"),
    "load_recipe": ("leanformers.recipes.schema", "load_training_recipe"),
    "METHODS": ("leanformers.recipes.methods", "METHODS"),
    "MethodBuilder": ("leanformers.recipes.methods", "MethodBuilder"),
    "TASKS": ("leanformers.recipes.tasks", "TASKS"),
    "SECTIONS": ("leanformers.recipes.schema", "SECTIONS"),
    "ByteTokenizer": ("leanformers.recipes.data", "ByteTokenizer"),
    "PackedBlocks": ("leanformers.recipes.data", "PackedBlocks"),
    "build_tokenizer": ("leanformers.recipes.data", "build_tokenizer"),
    "build_dataset": ("leanformers.recipes.data", "build_dataset"),
    "load_source": ("leanformers.recipes.data", "load_source"),
    "Examples": ("leanformers.recipes.supervised", "Examples"),
    "build_translation_dataset": ("leanformers.recipes.supervised", "build_translation_dataset"),
    "build_classification_dataset": ("leanformers.recipes.supervised", "build_classification_dataset"),
    "fsdp_config_from_accelerate_file": ("leanformers.recipes.runner", "fsdp_config_from_accelerate_file"),
}


def build_model(
    spec: dict, vocab_size: int | None = None, task: str = "causal_lm", defaults: dict | None = None
):
    """Deprecated: ``leanformers.recipes.models.build_model(spec, vocab_size, auto_class, defaults)``."""
    from leanformers.recipes.models import build_model as build
    from leanformers.recipes.tasks import TASKS

    warnings.warn(
        "leanformers.train.build_model moved to leanformers.recipes.models.build_model (its third argument is "
        "the Auto class name: leanformers.recipes.tasks.TASKS[task].auto_class)",
        FutureWarning,
        stacklevel=2,
    )
    return build(spec, vocab_size, TASKS[task].auto_class, defaults)


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, new = _MOVED[name]
    warnings.warn(f"leanformers.train.{name} moved to {module}.{new}", FutureWarning, stacklevel=2)
    return getattr(importlib.import_module(module), new)


if __name__ == "__main__":
    raise SystemExit(main())
