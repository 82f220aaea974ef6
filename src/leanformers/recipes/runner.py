"""Run a training recipe on HF Trainer + accelerate: :func:`prepare` builds everything, :func:`run` trains.

One process (``leanformers-train r.yaml``) or several (``accelerate launch --num_processes 2 [--cpu]
-m leanformers.train r.yaml``, ``torchrun --nproc_per_node 2 -m leanformers.train r.yaml``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from leanformers.recipes.checks import RecipeError
from leanformers.recipes.data import ByteTokenizer, build_tokenizer
from leanformers.recipes.loading import read_yaml
from leanformers.recipes.methods import METHODS, resolve_method
from leanformers.recipes.schema import load_training_recipe
from leanformers.recipes.tasks import TASKS, TaskParts
from leanformers.training.fsdp import save_full_model

__all__ = ["Prepared", "fsdp_config_from_accelerate_file", "prepare", "run"]

logger = logging.getLogger(__name__)


def fsdp_config_from_accelerate_file(training: dict) -> None:
    """``training.fsdp_config: recipes/accelerate/fsdp2.yaml``: the Trainer reads the ``fsdp_config`` of
    an accelerate config file (the one ``accelerate launch --config_file`` takes), so that one file
    configures both ways of launching; ``training.fsdp`` defaults to True then. In place."""
    path = training.get("fsdp_config")
    if not isinstance(path, str) or not path.endswith((".yaml", ".yml")):
        return  # a dict, or a JSON file TrainingArguments reads itself
    content = read_yaml(path)
    if not isinstance(content.get("fsdp_config"), dict):
        raise RecipeError(
            f"training.fsdp_config={path} holds no fsdp_config section: give an accelerate config file "
            "(e.g. recipes/accelerate/fsdp2.yaml) or a mapping"
        )
    training["fsdp_config"] = dict(content["fsdp_config"])
    training.setdefault("fsdp", True)


@dataclass
class Prepared:
    """A recipe built and ready to train: the Trainer, and what the results report."""

    recipe: dict
    method: str
    trainer: object
    parts: TaskParts
    callbacks: list
    tokenizer: object
    model_parameters: int
    notes: list[str] = field(default_factory=list)


def prepare(recipe: dict | str | os.PathLike, overrides: list[str] | None = None) -> Prepared:
    """Check the recipe, build tokenizer, data, model, method and Trainer (no training yet).

    Raises :class:`RecipeError` (or the builders' ValueError / FileNotFoundError) for bad input.
    """
    recipe = load_training_recipe(recipe, overrides)
    name, options, notes = resolve_method(recipe.get("method") or {"name": "dense"})
    for note in notes:
        logger.warning("%s", note)
    tokenizer = build_tokenizer(recipe.get("tokenizer"))
    parts = TASKS[recipe.get("task", "causal_lm")].build(recipe, tokenizer)
    n_params = sum(p.numel() for p in parts.model.parameters())
    model, callbacks = METHODS[name](parts.model, options)
    parts.model = model
    training = parts.training
    training.setdefault("report_to", "none")
    training.setdefault("save_strategy", "no")
    fsdp_config_from_accelerate_file(training)
    args = parts.args_class(**training)
    trainer = parts.trainer_class(
        model=model,
        args=args,
        train_dataset=parts.train,
        eval_dataset=parts.eval,
        callbacks=callbacks,
        **parts.trainer_kwargs,
    )
    return Prepared(recipe, name, trainer, parts, callbacks, tokenizer, n_params, notes)


def train_prepared(prepared: Prepared) -> dict:
    """Train, evaluate, save ``output_dir/final`` and ``output_dir/results.json``; returns the metrics."""
    trainer, parts = prepared.trainer, prepared.parts
    args = trainer.args
    result = trainer.train(resume_from_checkpoint=prepared.recipe.get("resume_from_checkpoint"))
    metrics = {
        "method": prepared.method,
        "world_size": args.world_size,
        "model_parameters": prepared.model_parameters,
    }
    metrics.update(result.metrics)
    metrics["trainable_parameters"] = sum(p.numel() for p in parts.model.parameters() if p.requires_grad)
    if prepared.notes:
        metrics["method_notes"] = prepared.notes
    for (
        callback
    ) in prepared.callbacks:  # a training-time method's whole-model summary (e.g. chtss/density_model)
        controller = getattr(callback, "controller", None)
        if controller is not None:
            metrics.update({k: v for k, v in controller.metrics().items() if k.count("/") == 1})
    if parts.eval is not None:
        evaluated = trainer.evaluate()
        metrics.update(evaluated)
        if parts.after_eval is not None:
            metrics.update(parts.after_eval(evaluated))
    out = Path(args.output_dir)
    save_full_model(trainer, out / "final")  # every rank: gathering a sharded (FSDP2) model is a collective
    if trainer.is_world_process_zero():
        if not isinstance(prepared.tokenizer, ByteTokenizer):
            # final/ then loads by itself (lm-eval / leanformers-eval, or a translation pipeline)
            prepared.tokenizer.save_pretrained(str(out / "final"))
        (out / "results.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def run(recipe: dict | str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Train as the recipe says: ``{"metrics", "trainer", "model"}`` (metrics also in ``output_dir/results.json``)."""
    prepared = prepare(recipe, overrides)
    metrics = train_prepared(prepared)
    return {"metrics": metrics, "trainer": prepared.trainer, "model": prepared.parts.model}
