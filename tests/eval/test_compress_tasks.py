"""mpifa-compress --tasks: lm-eval zero-shot accuracy before and after, in the summary, report and card."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

from leanformers.compression.cli import main  # noqa: E402
from leanformers.eval.zeroshot import accuracy_table, zero_shot  # noqa: E402

TASKS = "arc_easy,piqa"
LIMIT = 6


def _args(src, out, shared_data, *extra):
    calib = str(shared_data / "wikitext-2-v1-valid.txt")
    return [str(src), "--output", str(out), "--calib", calib, "--nsamples", "4", "--seqlen", "64"] + [
        "--device",
        "cpu",
        "--density",
        "0.6",
        *extra,
    ]


def test_tasks_before_and_after_in_summary_report_and_card(dense_folder, shared_data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = tmp_path / "out", tmp_path / "report.json"
    rc = main(
        _args(
            dense_folder,
            out,
            shared_data,
            "--tasks",
            TASKS,
            "--tasks-limit",
            str(LIMIT),
            "--report",
            str(report),
        )
    )
    assert rc == 0
    summary = capsys.readouterr().out
    full = json.loads(report.read_text())["zero_shot"]
    assert set(full["before"]) == set(full["after"]) == {"arc_easy", "piqa"}
    assert full["before"]["piqa"]["n"] == LIMIT
    tokenizer = AutoTokenizer.from_pretrained(out)
    # "before" is the dense model's score, "after" the saved compressed model's (reloaded from disk)
    dense = AutoModelForCausalLM.from_pretrained(dense_folder)
    after = AutoModelForCausalLM.from_pretrained(out)
    for model, key in ((dense, "before"), (after, "after")):
        table = accuracy_table(zero_shot(model, tokenizer, TASKS, limit=LIMIT))
        for task, row in table.items():
            assert full[key][task]["acc"] == pytest.approx(row["acc"])
            assert full[key][task]["acc_norm"] == pytest.approx(row["acc_norm"])
    line = f"zero-shot arc_easy acc (n={LIMIT})"
    expected = f"{full['before']['arc_easy']['acc']:.4f} -> {full['after']['arc_easy']['acc']:.4f}"
    assert line in summary and expected in summary
    card = (out / "README.md").read_text()
    assert f"zero-shot (lm-eval) piqa acc_norm (n={LIMIT})" in card


def test_unknown_task_fails_before_loading_the_model(tmp_path, shared_data, capsys):
    # the source does not exist: a task error raised first proves the check comes before the load
    rc = main(_args(tmp_path / "no-model", tmp_path / "out", shared_data, "--tasks", "arc_eazy"))
    assert rc == 1
    assert "unknown task(s) arc_eazy" in capsys.readouterr().err


def test_tasks_data_dir_is_the_folder_the_tasks_read(dense_folder, shared_data, tmp_path, monkeypatch):
    """--tasks-data-dir: PIQA read from a copy whose labels are flipped scores 1 - the real accuracy (the
    flag wins over LEANFORMERS_ZEROSHOT_DATA and the ../shared default)."""
    flipped = tmp_path / "zeroshot"
    flipped.mkdir()
    source = shared_data / "zeroshot"
    (flipped / "piqa-valid.jsonl").write_bytes((source / "piqa-valid.jsonl").read_bytes())
    labels = (source / "piqa-valid-labels.lst").read_text().split()
    (flipped / "piqa-valid-labels.lst").write_text("\n".join(str(1 - int(x)) for x in labels) + "\n")
    monkeypatch.setenv("LEANFORMERS_ZEROSHOT_DATA", str(tmp_path / "not-this-one"))
    reports = {}
    for name, folder in (("real", source), ("flipped", flipped)):
        reports[name] = tmp_path / f"{name}.json"
        args = ["--tasks", "piqa", "--tasks-limit", str(LIMIT), "--tasks-data-dir", str(folder)]
        rc = main(_args(dense_folder, tmp_path / name, shared_data, *args, "--report", str(reports[name])))
        assert rc == 0
    real, flip = (
        json.loads(reports[n].read_text())["zero_shot"]["before"]["piqa"] for n in ("real", "flipped")
    )
    assert flip["n"] == real["n"] == LIMIT
    assert flip["acc"] == pytest.approx(1 - real["acc"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks-data-dir", "{shared}/zeroshot"], "--tasks-data-dir names where --tasks reads its files"),
        (["--tasks", "piqa", "--tasks-data-dir", "{tmp}/empty"], "lacks piqa: piqa-valid.jsonl"),
        (["--tasks", "piqa", "--tasks-data-dir", "{tmp}/missing"], "does not exist"),
    ],
    ids=["without_tasks", "folder_lacks_files", "missing_folder"],
)
def test_tasks_data_dir_errors_come_before_the_model_loads(tmp_path, shared_data, capsys, extra, message):
    (tmp_path / "empty").mkdir()
    extra = [e.format(shared=shared_data, tmp=tmp_path) for e in extra]
    # the source does not exist: the error raised first proves the check comes before the load
    rc = main(_args(tmp_path / "no-model", tmp_path / "out", shared_data, *extra))
    assert rc == 1
    assert message in capsys.readouterr().err
