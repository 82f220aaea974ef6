"""The task registry: what a recipe's ``task:`` builds (model, datasets, Trainer, metrics).

A task is one :class:`Task` in :data:`TASKS`: its transformers Auto class, its ``data`` keys (checked
up front) and a ``build(recipe, tokenizer) -> TaskParts`` function. A new task is one builder and one
entry here; :mod:`leanformers.recipes.runner` runs whatever the entry returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from leanformers.recipes.checks import RecipeError
from leanformers.recipes.data import ByteTokenizer, build_dataset
from leanformers.recipes.models import build_model
from leanformers.recipes.supervised import build_classification_dataset, build_translation_dataset

__all__ = ["TASKS", "Task", "TaskParts"]


@dataclass
class TaskParts:
    """What a task hands the runner: the model, its data, the Trainer and its arguments' class."""

    model: Any
    train: Any
    eval: Any
    trainer_class: type
    args_class: type
    training: dict  # TrainingArguments keywords (the recipe's training section plus task defaults)
    trainer_kwargs: dict = field(default_factory=dict)  # data_collator, compute_metrics, ...
    after_eval: Callable[[dict], dict] | None = None  # extra metrics from trainer.evaluate()'s


@dataclass(frozen=True)
class Task:
    """One task of :data:`TASKS`.

    Attributes:
        auto_class: the transformers Auto class name of its model.
        args_class: ``TrainingArguments`` or ``Seq2SeqTrainingArguments`` (the training section's keys).
        data_keys: ``{key: type hint}`` of its ``data`` section.
        build: ``(recipe, tokenizer) -> TaskParts``.
        metrics: default ``evaluate`` metrics; empty: the task takes no ``metrics`` section.
        doc: one line for ``leanformers-train --help``.
        required_data: ``{key: what to give}`` of the ``data`` keys that must be present.
    """

    auto_class: str
    args_class: str
    data_keys: dict
    build: Callable[[dict, Any], TaskParts]
    metrics: tuple[str, ...] = ()
    doc: str = ""
    required_data: dict = field(
        default_factory=lambda: {"train": "FILE (a file, a folder or a datasets name)"}
    )


def _vocab_size(tokenizer) -> int | None:
    vocab = getattr(tokenizer, "vocab_size", None)
    return len(tokenizer) if vocab is not None and hasattr(tokenizer, "__len__") else vocab


def _causal_lm(recipe: dict, tokenizer) -> TaskParts:
    from transformers import Trainer, TrainingArguments

    train_ds, eval_ds = build_dataset(recipe["data"], tokenizer)
    model = build_model(recipe["model"], vocab_size=_vocab_size(tokenizer))

    def perplexity(metrics: dict) -> dict:
        return {"eval_perplexity": math.exp(metrics["eval_loss"])} if "eval_loss" in metrics else {}

    return TaskParts(
        model, train_ds, eval_ds, Trainer, TrainingArguments, dict(recipe["training"]), {}, perplexity
    )


def _transformers_tokenizer(tokenizer, task: str) -> dict:
    """Pad id defaults of a supervised task's model; refuses the byte tokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        raise RecipeError(f"task: {task} needs a transformers tokenizer (e.g. tokenizer: smollm2), not bytes")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return {"pad_token_id": tokenizer.pad_token_id}


def _translation(recipe: dict, tokenizer) -> TaskParts:
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    from leanformers.eval.metrics import translation_metrics

    defaults = _transformers_tokenizer(tokenizer, "translation")
    train_ds, eval_ds, references = build_translation_dataset(recipe["data"], tokenizer)
    defaults.update(
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    model = build_model(recipe["model"], len(tokenizer), TASKS["translation"].auto_class, defaults)
    training = dict(recipe["training"])
    training.setdefault("predict_with_generate", True)
    training.setdefault("generation_max_length", int(recipe["data"].get("max_target_length", 128)))
    metrics = translation_metrics(
        tokenizer, references, recipe.get("metrics") or list(TASKS["translation"].metrics)
    )
    kwargs = {
        "data_collator": DataCollatorForSeq2Seq(tokenizer, model=model),
        "compute_metrics": metrics,
        "processing_class": tokenizer,
    }
    # sacrebleu's signatures of eval_bleu / eval_chrf, set by the last evaluation
    return TaskParts(
        model, train_ds, eval_ds, Seq2SeqTrainer, Seq2SeqTrainingArguments, training, kwargs,
        lambda m: dict(getattr(metrics, "signatures", {})),
    )  # fmt: skip


def _classification(recipe: dict, tokenizer) -> TaskParts:
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from leanformers.eval.metrics import classification_metrics

    defaults = _transformers_tokenizer(tokenizer, "classification")
    train_ds, eval_ds, labels = build_classification_dataset(recipe["data"], tokenizer)
    defaults.update(num_labels=len(labels))
    model = build_model(recipe["model"], len(tokenizer), TASKS["classification"].auto_class, defaults)
    if model.config.num_labels != len(labels):
        raise RecipeError(
            f"model.config.num_labels={model.config.num_labels} but the data have {len(labels)} labels "
            f"{labels}: set model.config.num_labels={len(labels)} or leave it out"
        )
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    names = recipe.get("metrics") or list(TASKS["classification"].metrics)
    kwargs = {
        "data_collator": DataCollatorWithPadding(tokenizer),
        "compute_metrics": classification_metrics(len(labels), names),
        "processing_class": tokenizer,
    }
    return TaskParts(model, train_ds, eval_ds, Trainer, TrainingArguments, dict(recipe["training"]), kwargs)


def _distill(recipe: dict, tokenizer) -> TaskParts:
    """Healing by distillation (issue 20): the compressed ``model`` learns the dense ``data.teacher``'s
    next-token distributions on ``data.text`` (default: the teacher's own text), training only the
    compressed layers' factors, so ``final/`` is the same PIFA checkpoint at the same ranks."""
    from transformers import TrainingArguments

    from leanformers.compression.calibration import calibration_windows_for
    from leanformers.compression.config import CompressionConfig
    from leanformers.compressors.healing import (
        DistillationTrainer,
        HealingConfig,
        TokenWindows,
        freeze_all_but_factors,
    )
    from leanformers.hub import load_causal_lm

    if isinstance(tokenizer, ByteTokenizer):
        raise RecipeError(
            "task: distill needs the models' own tokenizer: add tokenizer: <the compressed folder or the "
            "teacher's Hub id / folder>"
        )
    data = recipe["data"]
    if (recipe.get("method") or {}).get("name", "dense") != "dense":
        raise RecipeError(
            "task: distill trains the compressed layers' own factors; leave the method section out "
            f"(got method.name={recipe['method']['name']!r})"
        )
    model = build_model(recipe["model"])
    try:
        freeze_all_but_factors(model)
    except ValueError as exc:
        raise RecipeError(f"model: {exc}") from None
    teacher, _ = load_causal_lm(data["teacher"], dtype=next(model.parameters()).dtype)
    seqlen, tokens = int(data.get("seqlen", 512)), int(data.get("tokens", 65_536))
    spec = CompressionConfig(
        nsamples=math.ceil(tokens / seqlen), seqlen=seqlen, seed=int(data.get("seed", 0))
    )
    windows, _ = calibration_windows_for(data.get("text", "self"), tokenizer, spec, model=teacher)
    training = dict(recipe["training"])
    for key, value in (
        ("learning_rate", HealingConfig.learning_rate),  # heal()'s default
        ("lr_scheduler_type", "cosine"),
        ("warmup_steps", 0.1),
        ("weight_decay", 0.0),
        ("num_train_epochs", 1),
        ("remove_unused_columns", False),
    ):
        training.setdefault(key, value)  # fmt: skip
    kwargs = {"teacher": teacher, "temperature": float(data.get("temperature", 1.0))}
    return TaskParts(
        model, TokenWindows(windows), None, DistillationTrainer, TrainingArguments, training, kwargs
    )


_LIMITS = {"max_train_examples": int | None, "max_eval_examples": int | None}
TASKS: dict[str, Task] = {
    "causal_lm": Task(
        "AutoModelForCausalLM",
        "TrainingArguments",
        {
            "train": str,
            "eval": str | None,
            "block_size": int,
            "eval_fraction": float | None,
            "max_train_tokens": int | None,
            "max_eval_tokens": int | None,
            "text_field": str,
        },
        _causal_lm,
        doc="language modelling on packed token blocks (default); reports eval_perplexity",
    ),
    "translation": Task(
        "AutoModelForSeq2SeqLM",
        "Seq2SeqTrainingArguments",
        {"train": dict, "eval": dict, "max_source_length": int, "max_target_length": int, **_LIMITS},
        _translation,
        metrics=("sacrebleu", "chrf"),
        doc="seq2seq on aligned {source, target} line files; BLEU / chrF with predict_with_generate",
    ),
    "classification": Task(
        "AutoModelForSequenceClassification",
        "TrainingArguments",
        {
            "train": str,
            "eval": str | None,
            "text_field": str,
            "label_field": str,
            "max_length": int,
            "eval_fraction": float,
            "seed": int,
            **_LIMITS,
        },
        _classification,
        metrics=("accuracy", "f1"),
        doc="sequence classification on a TSV / CSV / JSONL table; accuracy / F1",
    ),
    "distill": Task(
        "AutoModelForCausalLM",
        "TrainingArguments",
        {"teacher": str, "text": str, "tokens": int, "seqlen": int, "seed": int, "temperature": float},
        _distill,
        doc="heal a compressed model: KL to the dense data.teacher on data.text (default: self-generated), "
        "only the compressed layers' factors train",
        required_data={"teacher": "the dense model the student was compressed from (Hub id, folder, .gguf)"},
    ),
}
