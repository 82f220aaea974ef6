"""Offline lm-eval tasks: lm-eval's own task YAMLs with only the data source swapped for local files.

For each task we write a two-line YAML that ``include:``-s the YAML installed with lm-eval (its prompt,
``doc_to_*``, metrics, splits) and overrides ``dataset_path`` / ``dataset_kwargs`` (and for PIQA,
whose labels sit in a separate file, a ``custom_dataset`` loader). The folder of generated YAMLs is
passed to lm-eval's ``TaskManager`` as an ``include_path``; lm-eval indexes include paths after its
built-in tasks and lets a later path override an earlier task of the same name (with a warning), so
``arc_easy`` then means the local-data task.

The files expected in the data folder are those of ``../shared/data/zeroshot`` (see DATA.md there).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = [
    "LOCAL_TASKS",
    "default_data_dir",
    "lm_eval_task_yaml",
    "piqa_dataset",
    "resolve_data_dir",
    "write_local_tasks",
]

# task -> (lm-eval YAML relative to lm_eval/tasks, {split: file}, overrides of the split keys)
# Each split lm-eval's YAML evaluates is mapped to a local file; splits without a file are set to
# null so that lm-eval never asks the Hub for them (e.g. ARC's train split, only used for few-shot).
LOCAL_TASKS: dict[str, dict] = {
    "arc_easy": {
        "yaml": "arc/arc_easy.yaml",
        "files": {"test": "ARC-Easy-test.jsonl", "validation": "ARC-Easy-validation.jsonl"},
        "null_splits": ["training_split"],
    },
    "arc_challenge": {
        "yaml": "arc/arc_challenge.yaml",
        "files": {"test": "ARC-Challenge-test.jsonl", "validation": "ARC-Challenge-validation.jsonl"},
        "null_splits": ["training_split"],
    },
    "piqa": {
        "yaml": "piqa/piqa.yaml",
        "files": {"validation": "piqa-valid.jsonl", "validation_labels": "piqa-valid-labels.lst"},
        "null_splits": ["training_split"],
    },
    "winogrande": {
        "yaml": "winogrande/default.yaml",
        "files": {"validation": "winogrande-1.1-dev.jsonl"},
        "null_splits": ["training_split"],
    },
    "lambada_openai": {
        "yaml": "lambada/lambada_openai.yaml",
        "files": {"test": "lambada_openai_test.jsonl"},
        "null_splits": [],
    },
}


def lm_eval_task_yaml(task: str) -> Path:
    """Path of lm-eval's installed YAML for one of :data:`LOCAL_TASKS`."""
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / LOCAL_TASKS[task]["yaml"]
    if not path.is_file():
        raise FileNotFoundError(
            f"lm-eval's task file {path} is missing; this lm-eval version lays out its tasks differently. "
            "Install a supported lm-eval (pip install 'leanformers[eval]')."
        )
    return path


def default_data_dir() -> Path | None:
    """``../shared/data/zeroshot`` relative to the working directory or to this checkout, if present.

    ``LEANFORMERS_ZEROSHOT_DATA`` overrides both.
    """
    if os.environ.get("LEANFORMERS_ZEROSHOT_DATA"):
        return Path(os.environ["LEANFORMERS_ZEROSHOT_DATA"])
    here = Path(__file__).resolve()
    # src/leanformers/eval/tasks.py -> the repository root is parents[3]; shared/ sits beside it.
    for root in (Path.cwd(), here.parents[3]):
        candidate = root.parent / "shared" / "data" / "zeroshot"
        if candidate.is_dir():
            return candidate
    return None


def resolve_data_dir(data_dir: str | os.PathLike | None, tasks: list[str]) -> Path | None:
    """The folder local tasks read from, checked: every file the requested local tasks need is there.

    ``data_dir=None`` means the default folder when it exists, else no local tasks (lm-eval's Hub
    tasks run as usual). An explicit folder that does not exist, or lacks a file, is an error.
    """
    wanted = [t for t in tasks if t in LOCAL_TASKS]
    if data_dir is None:
        found = default_data_dir()
        if found is None:
            return None
        data_dir = found
    data_dir = Path(data_dir).expanduser()
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(
            f"zero-shot data folder {data_dir} does not exist; pass --data-dir (data_dir=) the folder that "
            f"holds the local task files (see ../shared/data/DATA.md), or --data-dir none to use "
            "lm-eval's Hub datasets"
        )
    missing = [
        f"{task}: {name}"
        for task in wanted
        for name in LOCAL_TASKS[task]["files"].values()
        if not (Path(data_dir) / name).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"zero-shot data folder {data_dir} lacks {', '.join(missing)}; put the files there "
            "(see ../shared/data/DATA.md) or pass --data-dir none to use lm-eval's Hub datasets"
        )
    return Path(data_dir).resolve()


def piqa_dataset(data_file: str, labels_file: str, **_metadata):
    """PIQA as lm-eval's Hub copy has it (goal, sol1, sol2, int label) from the authors' two files.

    Called by lm-eval through the task's ``custom_dataset`` hook, with the task metadata as extra
    keyword arguments (ignored).
    """
    import datasets

    rows = [json.loads(line) for line in Path(data_file).read_text(encoding="utf-8").splitlines() if line]
    labels = [int(x) for x in Path(labels_file).read_text(encoding="utf-8").split()]
    if len(rows) != len(labels):
        raise ValueError(f"{data_file} has {len(rows)} records but {labels_file} has {len(labels)} labels")
    records = {
        "goal": [r["goal"] for r in rows],
        "sol1": [r["sol1"] for r in rows],
        "sol2": [r["sol2"] for r in rows],
        "label": labels,
    }
    return datasets.DatasetDict({"validation": datasets.Dataset.from_dict(records)})


def _task_yaml(task: str, data_dir: Path) -> str:
    spec = LOCAL_TASKS[task]
    files = {split: str(data_dir / name) for split, name in spec["files"].items()}
    lines = [
        f"# Generated by leanformers: lm-eval's {spec['yaml']} with local data from {data_dir}.",
        f"include: {json.dumps(str(lm_eval_task_yaml(task)))}",
        f"task: {task}",
    ]
    if task == "piqa":
        lines += [
            "dataset_path: null",
            "custom_dataset: !function leanformers.eval.tasks.piqa_dataset",
            "dataset_kwargs:",
            f"  data_file: {json.dumps(files['validation'])}",
            f"  labels_file: {json.dumps(files['validation_labels'])}",
        ]
    else:
        lines += ["dataset_path: json", "dataset_name: null", "dataset_kwargs:", "  data_files:"]
        lines += [f"    {split}: {json.dumps(path)}" for split, path in files.items()]
    lines += [f"{key}: null" for key in spec["null_splits"]]
    return "\n".join(lines) + "\n"


def write_local_tasks(data_dir: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """Write the local task YAMLs for ``data_dir`` into ``folder`` (a new temporary folder by default).

    Only tasks whose files are all present are written. Returns the folder, to be passed to lm-eval
    as ``include_path``.
    """
    data_dir = Path(data_dir).resolve()
    out = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="leanformers-lm-eval-tasks-"))
    out.mkdir(parents=True, exist_ok=True)
    for task, spec in LOCAL_TASKS.items():
        if all((data_dir / name).is_file() for name in spec["files"].values()):
            (out / f"leanformers_{task}.yaml").write_text(_task_yaml(task, data_dir), encoding="utf-8")
    return out
