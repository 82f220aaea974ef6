"""The offline tasks are lm-eval's: same requests as lm-eval's registered tasks fed the same records."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from leanformers.eval.tasks import LOCAL_TASKS, resolve_data_dir, write_local_tasks  # noqa: E402
from leanformers.eval.zeroshot import task_manager  # noqa: E402

# lm-eval's Hub dataset of each task, the split it evaluates and the local records of that split
HUB = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", "ARC-Easy-test.jsonl"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", "ARC-Challenge-test.jsonl"),
    "piqa": ("baber/piqa", None, "validation", "piqa-valid.jsonl"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation", "winogrande-1.1-dev.jsonl"),
    "lambada_openai": ("EleutherAI/lambada_openai", "default", "test", "lambada_openai_test.jsonl"),
}
N_DOCS = 12


def _records(zeroshot, task):
    """The split's records as the Hub dataset has them (PIQA: the label joined from its own file)."""
    rows = [json.loads(line) for line in (zeroshot / HUB[task][3]).read_text().splitlines() if line]
    if task == "piqa":
        labels = (zeroshot / "piqa-valid-labels.lst").read_text().split()
        rows = [{**r, "label": int(y)} for r, y in zip(rows, labels, strict=True)]
    return rows


def _requests(task_obj, limit):
    task_obj.build_all_requests(limit=limit, rank=0, world_size=1)
    return [(inst.doc_id, inst.idx, inst.request_type, inst.arguments) for inst in task_obj.instances]


@pytest.fixture(scope="module")
def zeroshot(shared_data):
    return shared_data / "zeroshot"


@pytest.fixture(scope="module")
def builtin_tasks(zeroshot):
    """lm-eval's registered tasks (its own TaskManager, no include path) with the Hub replaced by
    the local records: ``datasets.load_dataset`` answers the Hub ids the task YAMLs name, and only
    those, so the test also checks which dataset each registered task asks for."""
    import datasets
    from lm_eval.tasks import TaskManager

    asked = []
    real = datasets.load_dataset

    def hub(path, name=None, **kwargs):
        for task, (hub_path, hub_name, split, _) in HUB.items():
            if path == hub_path and name == hub_name:
                asked.append(task)
                # the evaluated split holds the records; the few-shot splits (unused at zero shot)
                # must merely exist
                ds = datasets.Dataset.from_list(_records(zeroshot, task))
                return datasets.DatasetDict({s: ds for s in {split, "train", "validation"}})
        return real(path, name=name, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(datasets, "load_dataset", hub)
    try:
        tasks = TaskManager().load(list(HUB))["tasks"]
    finally:
        mp.undo()
    assert sorted(asked) == sorted(HUB)
    return tasks


def test_local_tasks_issue_the_requests_of_lm_evals_registered_tasks(zeroshot, builtin_tasks):
    local = task_manager(list(HUB), zeroshot).load(list(HUB))["tasks"]
    for task in HUB:
        mine, theirs = local[task], builtin_tasks[task]
        # the data come from the local files, everything else from lm-eval's YAML
        assert mine.config.dataset_path != theirs.config.dataset_path
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "output_type", "metric_list"):
            assert getattr(mine.config, key) == getattr(theirs.config, key), (task, key)
        # the full local split is there, in file order
        docs = list(mine.eval_docs)
        assert len(docs) == len(_records(zeroshot, task)) == len(list(theirs.eval_docs))
        assert docs[:N_DOCS] == list(theirs.eval_docs)[:N_DOCS]
        a, b = _requests(mine, N_DOCS), _requests(theirs, N_DOCS)
        assert len(a) >= N_DOCS and a == b, task
        # contexts and continuations are real text, e.g. ARC's "Question: ...\nAnswer:"
        context, continuation = a[0][3][:2]
        assert context and continuation


def test_local_tasks_override_builtins_by_name(zeroshot):
    manager = task_manager(["arc_easy"], zeroshot)
    for task in LOCAL_TASKS:
        assert manager.task_index[task].yaml_path.name == f"leanformers_{task}.yaml"
    # lm-eval's other tasks stay registered (online they read the Hub as usual)
    assert manager.match_tasks(["hellaswag"]) == ["hellaswag"]


def test_generated_yaml_includes_lm_evals_yaml_and_only_swaps_the_data(zeroshot, tmp_path):
    folder = write_local_tasks(zeroshot, tmp_path)
    text = (folder / "leanformers_winogrande.yaml").read_text()
    keys = {line.split(":")[0] for line in text.splitlines() if line and not line.startswith((" ", "#"))}
    assert keys == {"include", "task", "dataset_path", "dataset_name", "dataset_kwargs", "training_split"}
    assert "lm_eval/tasks/winogrande/default.yaml" in text


def test_missing_data_dir_and_missing_file_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass --data-dir"):
        resolve_data_dir(tmp_path / "nowhere", ["arc_easy"])
    (tmp_path / "ARC-Easy-test.jsonl").write_text("")
    with pytest.raises(
        FileNotFoundError, match=r"lacks arc_easy: ARC-Easy-validation.jsonl.*--data-dir none"
    ):
        resolve_data_dir(tmp_path, ["arc_easy"])


def test_unknown_task_names_the_fix(zeroshot):
    with pytest.raises(ValueError, match=r"unknown task\(s\) arc_eazy.*leanformers-eval ls tasks"):
        task_manager(["arc_easy", "arc_eazy"], zeroshot)
