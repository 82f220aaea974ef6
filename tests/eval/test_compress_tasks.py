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
