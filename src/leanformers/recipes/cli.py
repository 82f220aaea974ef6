"""``leanformers-train RECIPE.yaml [--set key.sub=value ...]``: the command line over :mod:`~leanformers.recipes.runner`.

A bad recipe (unknown key, wrong type, unknown method, missing file) ends in one line on stderr naming
the key and the fix, exit code 2, no traceback (``LEANFORMERS_TRACEBACK=1`` shows it). ``--help``
lists the sections, their keys and the methods; ``--keys SECTION`` every key of one section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import textwrap

from leanformers.recipes.checks import RecipeError
from leanformers.recipes.methods import METHODS, Method
from leanformers.recipes.models import DTYPES
from leanformers.recipes.schema import REQUIRED, method_option_types, training_types
from leanformers.recipes.tasks import TASKS

__all__ = ["help_text", "keys_text", "main"]

# raised while the recipe is checked and built, before training: a user's input, not a bug
USAGE_ERRORS = (RecipeError, ValueError, FileNotFoundError, NotADirectoryError)


def _wrap(label: str, text: str, width: int = 108) -> str:
    return textwrap.fill(text, width, initial_indent=f"  {label:<11}", subsequent_indent=" " * 13)


def help_text() -> str:
    """The sections, their keys and the methods (``--help``'s epilog)."""
    n_training = len(training_types())
    lines = [f"sections (required: {', '.join(REQUIRED)}):"]
    lines.append(
        _wrap(
            "model",
            f"config: {{model_type: llama, <its config fields>}} | pretrained: PATH-OR-HUB-ID; dtype: {' | '.join(DTYPES)}; seed: int",
        )
    )
    lines.append(
        _wrap(
            "tokenizer",
            "bytes (UTF-8, vocab 256) | smollm2 | PATH-OR-HUB-ID | {bpe: {files: [...], vocab_size, min_frequency}, cache_dir}",
        )
    )
    for name, task in TASKS.items():
        lines.append(_wrap("data" if name == "causal_lm" else "", f"{name}: {', '.join(task.data_keys)}"))
    lines.append(_wrap("method", "name: METHOD, plus METHOD: {its options} for any methods (see below)"))
    lines.append(
        _wrap(
            "training",
            f"transformers.TrainingArguments fields ({n_training}; Seq2SeqTrainingArguments for translation), e.g. output_dir, max_steps, learning_rate, per_device_train_batch_size: --keys training lists them",
        )
    )
    lines.append(_wrap("task", " | ".join(f"{n} ({t.doc})" for n, t in TASKS.items())))
    lines.append(
        _wrap(
            "metrics",
            "; ".join(f"{n}: {', '.join(t.metrics)}" for n, t in TASKS.items() if t.metrics)
            + " (evaluate names)",
        )
    )
    lines.append(
        _wrap("resume", "resume_from_checkpoint: a checkpoint folder, or true (the last one of output_dir)")
    )
    lines.append("methods (options: --keys method.NAME):")
    presets = [n for n, m in METHODS.items() if isinstance(m, Method) and m.family == "dst"]
    for name, method in METHODS.items():
        if name not in presets:
            lines.append(_wrap(name, getattr(method, "doc", "") or "a registered builder"))
    lines.append(_wrap("DST", f"{', '.join(presets)}: CHTssConfig presets, options are CHTssConfig fields"))
    lines.append(
        "method.name=OTHER keeps the recipe's rank / targets (low-rank) or density / targets (DST) and says what changed."
    )
    lines.append(
        "examples: --set training.max_steps=10 method.sst.r=8 | --set method.name=lora | --keys method.chtss"
    )
    return "\n".join(lines)


def _field_help(cls: type) -> dict[str, str]:
    return {f.name: str(f.metadata.get("help", "")).split(". ")[0] for f in dataclasses.fields(cls)}


def keys_text(section: str) -> str:
    """Every key of ``training`` or ``method.NAME`` with its type (and help where the library has one)."""
    import transformers

    if section == "training":
        cls = getattr(transformers, TASKS["causal_lm"].args_class)
        types, docs = training_types(), _field_help(cls)
    elif section.startswith("method.") and section[len("method.") :] in METHODS:
        name = section[len("method.") :]
        types = method_option_types(name)
        if types is None:
            return f"{section}: a registered builder; its options are not declared"
        method = METHODS[name]
        docs = _field_help(method.options()) if method.options is not None else {}
    else:
        raise RecipeError(f"--keys {section}: give training or method.NAME (methods: {', '.join(METHODS)})")
    width = max(map(len, types), default=0)
    rows = [
        f"{k:<{width}}  {str(t).replace('typing.', '')}  {docs.get(k, '')}".rstrip()
        for k, t in sorted(types.items())
    ]
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leanformers-train",
        description="Train as a YAML recipe says, on HF Trainer + accelerate (one or several processes).",
        epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override entries (YAML values)",
    )
    parser.add_argument(
        "--keys", metavar="SECTION", help="list every key of training or method.NAME and exit"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from leanformers.recipes.runner import prepare, train_prepared

    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("leanformers").setLevel(logging.INFO)
    try:
        if args.keys:
            print(keys_text(args.keys))
            return 0
        if not args.recipe:
            parser.error("give a RECIPE.yaml (or --keys SECTION)")
        prepared = prepare(args.recipe, args.overrides)
    except USAGE_ERRORS as exc:
        if os.environ.get("LEANFORMERS_TRACEBACK"):
            raise
        message = " ".join(str(exc).split())
        print(f"leanformers-train: error: {message}", file=sys.stderr)
        return 2
    metrics = train_prepared(prepared)
    if prepared.trainer.is_world_process_zero():
        print(json.dumps(metrics, indent=2, default=str))
    return 0
