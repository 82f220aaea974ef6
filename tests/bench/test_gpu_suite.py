"""bench/gpu_suite.py: the CPU dry run of every part (rows of the runners), resume, caps and the budget."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.bench.conftest import BENCH, load_bench
from tests.helpers import REPO_ROOT


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite_out")
    state = tmp_path_factory.mktemp("gpu_suite_state")
    payload = load_bench("gpu_suite").main(["--dry-run", "--output-dir", str(out), "--state-dir", str(state)])
    return payload, out, state


@pytest.mark.slow
def test_dry_run_every_part_produces_its_result_keys(dry_run):
    suite = load_bench("gpu_suite")
    payload, out, _ = dry_run
    saved = json.loads((out / "gpu_suite.json").read_text())
    assert list(saved["parts"]) == suite.PART_NAMES == list(payload["parts"])
    assert saved["dry_run"] is True and saved["setup"]["status"] == "ok"
    for name, part in suite.PARTS.items():
        entry = saved["parts"][name]
        assert entry["expected_s"] == part["expected_s"] and entry["cap_s"] == suite.DRY_CAP_S
        if entry["status"] == "skipped":  # only a missing prerequisite (lm-eval, evaluate) skips
            assert part.get("needs") and "not importable" in entry["reason"], name
            continue
        assert entry["status"] == "ok", (name, entry.get("error"))
        assert len(entry["results"]) == len(entry["commands"]) == len(part["dry"])
        assert all(set(part["keep"]) <= set(r) for r in entry["results"]), name
        assert all(c.startswith(f"python bench/{part['runner']}.py ") for c in entry["commands"])
    parts = {name: e["results"][-1] for name, e in saved["parts"].items() if e["status"] == "ok"}
    # MPIFA: exactly the headline cells, each evaluated in and out of the calibration domain, with targets
    head = parts["mpifa_headline"]["cells"]
    assert {(c["row"], c["density"]) for c in head} == {
        ("dense", 1.0), ("mpifa", 0.5), ("wanda24", 0.5), ("sparsegpt24", 0.5), ("svdllm_whiten", 0.5)
    }  # fmt: skip
    assert all(math.isfinite(c["ppl"]) and math.isfinite(c["ppl_ood"]) and c["ppl"] > 1 for c in head)
    assert any("2:4 Wanda" in t for t in parts["mpifa_headline"]["targets"])
    assert any("2:4 SparseGPT" in t for t in parts["mpifa_headline"]["targets"])
    # CHTss LLaMA reached its density; the MLP rows carry accuracies and active neurons
    chtss = [r for r in parts["chtss_llama"]["rows"] if r["method"] == "chtss"]
    assert chtss and all(r["density_sparse_subset"] == pytest.approx(0.3, abs=2e-3) for r in chtss)
    assert all(0 < r["test_accuracy"] <= 1 for r in parts["chtss_mlp"]["rows"])
    assert parts["chtss_overhead"]["rows"][0]["updates"] >= 1
    # SST: the three methods trained on the same token budget; the cost rows of each method
    quality = {r["method"]: r for r in parts["sst_quality"]["rows"]}
    assert set(quality) == {"full", "lora", "sst"} and len({r["train_tokens"] for r in quality.values()}) == 1
    assert {r["method"] for r in parts["sst_cost"]["rows"]} == {"full", "lora", "sst"}
    # end to end: dense vs MPIFA layout vs U V, prefill and decode (the CPU dry run decodes eagerly)
    for name in ("pifa_e2e", "pifa_e2e_decode"):
        e2e = parts[name]["end_to_end"]
        assert e2e["decode_tokens"] > 0 and e2e["decode_mode"] == "eager"
        assert {(s["dtype"], s["variant"]) for s in e2e["speedups"]} == {
            ("float32", "mpifa@0.5"),
            ("float32", "lowrank@0.5"),
        }
        assert [r["dtype"] for r in e2e["pifa_vs_lowrank"]] == ["float32"]
    assert set(parts["pifa_layers"]["targets"]) and parts["chtss_cost"]["rows"][0]["full_update_ms"] > 0
    # issue 20: the default calibration's MPIFA healed by distillation, five texts and the factual check
    (heal,) = parts["mpifa_heal"]["cells"]
    assert (heal["row"], heal["density"], heal["heal_tokens"]) == ("default", 0.8, 256)
    assert all(math.isfinite(heal["healing"][k]) for k in ("kl_before", "kl_after"))
    assert heal["healing"]["kept"] == (heal["healing"]["kl_after"] < heal["healing"]["kl_before"])
    assert set(heal["ppl"]) == {"ted", "torch", "wiki", "shakespeare", "stdlib"}
    assert all(math.isfinite(v["ppl"]) and v["ppl"] > 1 for v in heal["ppl"].values())
    assert heal["facts"]["dense_correct"] > 0 and len(heal["facts"]["answers"]) >= 20
    log, table = (out / "gpu_suite.log").read_text(), (out / "gpu_suite.md").read_text()
    assert all(f"== {name}" in log and f"| {name} |" in table for name in suite.PART_NAMES)


@pytest.mark.slow
def test_second_run_reuses_finished_parts_from_the_state_folder(dry_run, tmp_path):
    _, _, state = dry_run
    argv = [
        "--dry-run",
        "--output-dir",
        str(tmp_path),
        "--state-dir",
        str(state),
        "--parts",
        "pifa_layers",
        "sst_cost",
    ]
    payload = load_bench("gpu_suite").main(argv)
    first = json.loads((state / "state.json").read_text())
    assert list(payload["parts"]) == ["pifa_layers", "sst_cost"]
    for name in ("pifa_layers", "sst_cost"):
        entry = payload["parts"][name]
        assert entry["status"] == "reused" and entry["reused_from"] == first[name]["date"]
        assert entry["results"] == first[name]["results"]  # the saved numbers, not a new measurement


@pytest.mark.slow
def test_a_part_past_its_cap_is_stopped_and_the_suite_goes_on(tmp_path):
    argv = ["--dry-run", "--output-dir", str(tmp_path / "out"), "--state-dir", str(tmp_path / "state")]
    payload = load_bench("gpu_suite").main(
        [*argv, "--parts", "chtss_llama", "mpifa_cost_7b", "--cap", "chtss_llama=0.5"]
    )
    stopped, cost = payload["parts"]["chtss_llama"], payload["parts"]["mpifa_cost_7b"]
    assert stopped["status"] == "timeout" and stopped["error"] == "stopped at its cap of 0.5 s"
    assert stopped["seconds"] < 5  # stopped, not run to the end
    assert cost["status"] == "ok" and "row" in cost["results"][0]
    # a stopped part is not reused: the next run does it again
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert "chtss_llama" not in state and "mpifa_cost_7b" in state


def test_no_part_starts_once_the_budget_is_spent(tmp_path):
    argv = ["--dry-run", "--output-dir", str(tmp_path), "--state-dir", str(tmp_path / "s"), "--budget", "0"]
    payload = load_bench("gpu_suite").main(argv)
    assert {e["status"] for e in payload["parts"].values()} == {"skipped"}
    assert all(
        "budget spent" in e["reason"] or "not importable" in e["reason"] for e in payload["parts"].values()
    )
    assert json.loads((tmp_path / "gpu_suite.json").read_text())["parts"].keys() == payload["parts"].keys()


def test_unknown_parts_and_caps_are_refused(tmp_path):
    suite = load_bench("gpu_suite")
    with pytest.raises(SystemExit):
        suite.main(["--dry-run", "--parts", "pifa_layer"])
    with pytest.raises(SystemExit, match="unknown part"):
        suite.main(["--dry-run", "--cap", "pifa_layer=3"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_the_gpu_run_refuses_to_start_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA device.*--dry-run"):
        load_bench("gpu_suite").main(["--output-dir", str(tmp_path)])


def test_suite_imports_without_lm_eval_datasets_evaluate_and_says_why_a_part_is_skipped():
    # The GPU machine has none of the three: the suite must import and name what is missing.
    code = (
        "import sys\n"
        "for m in ('lm_eval', 'datasets', 'evaluate'): sys.modules[m] = None\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "import gpu_suite\n"
        "print(gpu_suite.missing_need(gpu_suite.PARTS['zeroshot']['needs'], False, {'status': 'ok'}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lm_eval and datasets not importable" in out.stdout


def test_the_parts_before_the_budget_line_fit_the_budget_and_every_command_parses():
    suite = load_bench("gpu_suite")
    names = suite.PART_NAMES
    before = names[: names.index("mpifa_cost_7b") + 1]
    assert suite.SETUP_S + sum(suite.PARTS[n]["expected_s"] for n in before) <= suite.DEFAULT_BUDGET_S
    assert names.index("pifa_e2e") < names.index("mpifa_cost_7b") < names.index("pifa_e2e_decode")
    # every GPU and dry command is accepted by its runner's parser, rows and --set keys included
    harness = load_bench("harness")
    for part in suite.PARTS.values():
        runner = load_bench(part["runner"])
        for argv in part["gpu"] + part["dry"]:
            args = runner.build_parser().parse_args([str(a) for a in argv])
            for row in args.rows or []:
                sets = getattr(args, "sets", None) or getattr(args, "overrides", [])
                harness.row_settings(row, runner.ROWS[row], args.quick, sets)
