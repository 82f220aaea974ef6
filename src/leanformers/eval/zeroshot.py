"""Zero-shot accuracy of an in-memory model with lm-eval (HFLM around the instance, offline tasks).

lm-eval is imported lazily: ``import leanformers`` stays light when the ``eval`` extra is absent.
"""

from __future__ import annotations

import atexit
import os
import shutil
from pathlib import Path

import torch

from leanformers.eval.tasks import LOCAL_TASKS, resolve_data_dir, write_local_tasks

__all__ = ["accuracy_table", "check_task_names", "model_folder_error", "task_manager", "zero_shot"]

_NO_DATA_DIR = ("none", "hub", "")


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "zero-shot evaluation needs lm-eval: pip install 'leanformers[eval]' (or pip install lm-eval)"
        ) from exc


# Indexing lm-eval's thousands of task YAMLs takes seconds: one TaskManager per data folder and
# process, its generated YAML folder removed at exit.
_MANAGERS: dict[str, object] = {}


def task_manager(tasks: list[str], data_dir: str | os.PathLike | None = None):
    """lm-eval ``TaskManager`` whose ``tasks`` among :data:`LOCAL_TASKS` read local files.

    ``data_dir``: folder of the local files; None = ``../shared/data/zeroshot`` when it exists;
    ``"none"`` = lm-eval's Hub tasks only. Raises FileNotFoundError / ValueError naming the fix for a
    missing folder or file and for an unknown task.
    """
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    resolved = None
    if not (isinstance(data_dir, str) and data_dir.lower() in _NO_DATA_DIR):
        resolved = resolve_data_dir(data_dir, tasks)
    key = str(resolved)
    if key not in _MANAGERS:
        include = None
        if resolved is not None:
            include = write_local_tasks(resolved)
            atexit.register(shutil.rmtree, include, True)
        _MANAGERS[key] = TaskManager(include_path=str(include) if include else None)
    manager = _MANAGERS[key]
    check_task_names(tasks, manager)
    return manager


def check_task_names(tasks: list[str], manager) -> None:
    """Raise ValueError naming unknown tasks and the way to list the known ones."""
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ValueError(
            f"unknown task(s) {', '.join(unknown)}; offline tasks are {', '.join(LOCAL_TASKS)} "
            "(see `leanformers-eval ls tasks` for all of lm-eval's)"
        )


def zero_shot(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str] | str = ("arc_easy", "piqa"),
    *,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    data_dir: str | os.PathLike | None = None,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    **simple_evaluate_kwargs,
) -> dict:
    """Run lm-eval's ``simple_evaluate`` on an in-memory causal LM (dense, MPIFA, PEFT, sparse).

    Args:
        model: a transformers causal LM (or a PEFT model wrapping one), already on its device.
        tokenizer: its tokenizer.
        tasks: lm-eval task names, e.g. ``["arc_easy", "piqa"]`` (a comma-separated string works).
        limit: documents per task (an int), or a fraction of each task (a float < 1); None = all.
        batch_size: requests per forward pass.
        data_dir: folder of the local task files (default ``../shared/data/zeroshot`` when it
            exists); ``"none"`` uses lm-eval's Hub datasets.
        num_fewshot, max_length: passed to lm-eval (None = the task's / model's default).

    Returns:
        lm-eval's results dict (``results``, ``n-samples``, ``configs``, ``versions``, ...; per-document
        samples are dropped). :func:`accuracy_table` turns it into ``{task: {metric: value}}``.
    """
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("give at least one task, e.g. tasks=['arc_easy', 'piqa']")
    manager = task_manager(tasks, data_dir)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        lm_kwargs = {"batch_size": batch_size, "device": str(device)}
        if max_length is not None:
            lm_kwargs["max_length"] = max_length
        lm = HFLM(pretrained=model, tokenizer=tokenizer, **lm_kwargs)
        results = simple_evaluate(
            model=lm,
            tasks=tasks,
            limit=limit,
            num_fewshot=num_fewshot,
            task_manager=manager,
            log_samples=False,
            **simple_evaluate_kwargs,
        )
    finally:
        model.train(was_training)
    if results is None:  # non-zero ranks in a distributed run
        return {}
    results.pop("samples", None)
    return results


def accuracy_table(results: dict) -> dict[str, dict]:
    """``{task: {"acc": ..., "acc_norm": ..., "perplexity": ..., "n": ...}}`` from lm-eval's results.

    lm-eval keys metrics as ``"acc,none"`` (metric, filter); the stderr entries are kept as
    ``acc_stderr``.
    """
    table: dict[str, dict] = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            name, _, _filter = key.partition(",")
            row[name] = float(value)
        n = results.get("n-samples", {}).get(task, {})
        if n:
            row["n"] = int(n.get("effective", n.get("original", 0)))
        table[task] = row
    return table


def format_accuracy_table(table: dict[str, dict]) -> list[str]:
    """One line per task: ``arc_easy  acc 0.4310  acc_norm 0.3920  (n=100)``."""
    lines = []
    for task, row in table.items():
        parts = [f"{m} {row[m]:.4f}" for m in ("acc", "acc_norm", "perplexity") if m in row]
        lines.append(f"{task}  " + "  ".join(parts) + (f"  (n={row['n']})" if "n" in row else ""))
    return lines


def model_folder_error(path: str | os.PathLike) -> str | None:
    """A message when ``path`` is a local folder that holds no model (None when it looks like one)."""
    p = Path(path).expanduser()
    if not p.exists():
        if str(path).startswith((".", "/", "~")) or str(path).count("/") > 1:
            return f"model folder {path} does not exist"
        return None  # a Hub id
    if p.is_file():
        return f"{path} is a file, not a model folder; pass the folder that holds config.json"
    if (p / "config.json").is_file() or (p / "adapter_config.json").is_file():
        return None
    return (
        f"{path} is not a model folder (no config.json); pass a folder written by save_pretrained, "
        "mpifa-compress or leanformers-train (its final/ subfolder)"
    )


def before_after_rows(before: dict[str, dict], after: dict[str, dict]) -> dict[str, str]:
    """Summary lines ``{"arc_easy acc (n=100)": "0.4310 -> 0.4100", ...}`` from two accuracy tables."""
    rows = {}
    for task, row in before.items():
        for metric in ("acc", "acc_norm", "perplexity"):
            if metric in row and metric in after.get(task, {}):
                key = f"{task} {metric} (n={row.get('n', '?')})"
                rows[key] = f"{row[metric]:.4f} -> {after[task][metric]:.4f}"
    return rows
