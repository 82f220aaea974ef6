"""The schema of a training recipe, checked before anything is built.

::

    model:     {config: {model_type: llama, ...}, seed: 0} | {pretrained: path-or-id, dtype: bfloat16}
    tokenizer: bytes | smollm2 | path-or-hub-id | {bpe: {files: [...], vocab_size: 4000}}
    data:      the task's keys (train, eval, block_size, ...)
    method:    {name: sst, sst: {r: 64, ...}}              # the method registry's names
    training:  transformers.TrainingArguments fields        # Seq2SeqTrainingArguments for translation
    task:      causal_lm (default) | translation | classification | distill
    metrics:   [sacrebleu, chrf] ...                        # supervised tasks only
    resume_from_checkpoint: path | true

Every key is checked against its section (dataclass fields, with "did you mean"), every value
against its type (int, float, bool, choices), and the chosen method's config is built: errors are a
:class:`RecipeError` of one line naming the key and the fix.
"""

from __future__ import annotations

import os
from typing import Any

from leanformers.recipes.checks import RecipeError, check_value, field_types, unknown_choice, unknown_key
from leanformers.recipes.loading import apply_overrides, read_yaml
from leanformers.recipes.methods import METHODS, Method, resolve_method
from leanformers.recipes.models import check_model_section
from leanformers.recipes.tasks import TASKS

__all__ = [
    "REQUIRED",
    "SECTIONS",
    "check_recipe",
    "load_training_recipe",
    "method_option_types",
    "training_types",
]

SECTIONS = ("model", "tokenizer", "data", "method", "training", "task", "metrics", "resume_from_checkpoint")
REQUIRED = ("model", "data", "training")


def training_types(task: str = "causal_lm") -> dict[str, Any]:
    """{TrainingArguments field: type hint} of the task's arguments class."""
    import transformers

    return field_types(getattr(transformers, TASKS[task].args_class))


def method_option_types(name: str) -> dict[str, Any] | None:
    """{option: type hint} of a registered method (None: a plain builder, options not checked)."""
    method = METHODS[name]
    if not isinstance(method, Method):
        return None
    types = dict(method.extra_options or {})
    if method.options is not None:
        types.update({k: v for k, v in field_types(method.options()).items() if k != "method"})
    return types


def _check_mapping(path: str, section, types: dict[str, Any], listing: str | None = None) -> None:
    if not isinstance(section, dict):
        raise RecipeError(f"{path}={section!r}: expected a mapping (key: value entries)")
    for key, value in list(section.items()):
        if key not in types:
            raise unknown_key(path, key, types, listing)
        section[key] = check_value(f"{path}.{key}", value, types[key])


def _check_method(method) -> list[str]:
    task_methods = METHODS
    if not isinstance(method, dict):
        raise RecipeError(f"method={method!r}: expected a mapping, e.g. method: {{name: sst, sst: {{r: 8}}}}")
    name = method.get("name", "dense")
    if name not in task_methods:
        raise unknown_choice("method.name", name, task_methods, "method", ", ".join(sorted(task_methods)))
    for key, options in method.items():
        if key == "name":
            continue
        if key not in task_methods:
            raise unknown_key("method", key, task_methods, "name and the method names", what="method section")
        types = method_option_types(key)
        if types == {} and options:
            raise RecipeError(
                f"method.{key}: {key} takes no options, got {sorted(options)}: remove method.{key}"
            )
        if types is not None and options is not None:
            _check_mapping(f"method.{key}", options, types)
    name, options, notes = resolve_method(method)
    spec = METHODS[name]
    if isinstance(spec, Method) and spec.make_config is not None:
        try:
            spec.make_config(dict(options))
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"method.{name}: {' '.join(str(exc).split())}") from exc
    return notes


def _check_tokenizer(spec) -> None:
    if spec is None or isinstance(spec, str):
        return
    if not isinstance(spec, dict):
        raise RecipeError(f"tokenizer={spec!r}: expected bytes, smollm2, a path / Hub id or {{bpe: {{...}}}}")
    _check_mapping("tokenizer", spec, {"bpe": dict, "cache_dir": str | None})
    if "bpe" in spec:
        _check_mapping("tokenizer.bpe", spec["bpe"], {"files": list, "vocab_size": int, "min_frequency": int})


def _check_sections(recipe: dict, task: str) -> None:
    for key in recipe:
        if key not in SECTIONS:
            raise unknown_key("", key, SECTIONS, what="recipe section")
    for section in REQUIRED:
        if section not in recipe:
            raise RecipeError(f"the recipe has no '{section}' section: add {section}: {{...}} (see --help)")
    if recipe.get("metrics") is not None:
        if not TASKS[task].metrics:
            raise RecipeError(
                f"metrics: task {task} takes none (they apply to task: translation or classification)"
            )
        check_value("metrics", recipe["metrics"], list[str])
    check_value("resume_from_checkpoint", recipe.get("resume_from_checkpoint"), str | bool | None)


def check_recipe(recipe: dict) -> list[str]:
    """Check every section of a training recipe (in place: YAML-misread floats are converted).

    Returns the notes of the method resolution (:func:`leanformers.recipes.methods.resolve_method`);
    raises :class:`RecipeError` naming the first bad key and the fix.
    """
    task = recipe.get("task", "causal_lm")
    if task not in TASKS:
        raise unknown_choice("task", task, TASKS, "task")
    _check_sections(recipe, task)
    check_model_section(recipe["model"])
    _check_tokenizer(recipe.get("tokenizer"))
    _check_mapping("data", recipe["data"], TASKS[task].data_keys)
    for key, what in TASKS[task].required_data.items():
        if key not in recipe["data"]:
            raise RecipeError(f"data needs a {key!r} source: data.{key}={what}")
    _check_mapping(
        "training", recipe["training"], training_types(task), "see `leanformers-train --keys training`"
    )
    return _check_method(recipe.get("method") or {"name": "dense"})


def load_training_recipe(source: str | os.PathLike | dict, overrides: list[str] | None = None) -> dict:
    """Read a training recipe (YAML path or dict), apply ``key.sub=value`` overrides, check it all."""
    recipe = apply_overrides(read_yaml(source), overrides)
    check_recipe(recipe)
    return recipe
