"""bench/gpu_suite.py: the CPU dry run of every part, resume, caps, the budget and the carried GGUF."""

from __future__ import annotations

import hashlib
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
    for part in suite.PARTS:
        entry = saved["parts"][part.name]
        assert entry["expected_s"] == part.expected_s and entry["cap_s"] == suite.DRY_CAP_S
        if entry["status"] == "skipped":  # only a missing prerequisite (lm-eval, the MT script) skips
            assert part.needs and entry["reason"], part.name
            continue
        assert entry["status"] == "ok", (part.name, entry.get("error"))
        assert set(part.keys) <= set(entry), part.name
        assert entry["commands"] and all(c.startswith("python bench/") for c in entry["commands"])
    parts = saved["parts"]
    # MPIFA: exactly the headline cells, each evaluated in and out of the calibration domain
    head = parts["mpifa_headline"]["cells"]
    assert {(c["row"], c["density"]) for c in head} == {
        ("dense", 1.0),
        ("mpifa", 0.5),
        ("wanda24", 0.5),
        ("svdllm_whiten", 0.5),
    }
    assert all(math.isfinite(c["ppl"]) and math.isfinite(c["ppl_ood"]) and c["ppl"] > 1 for c in head)
    assert "tinyshakespeare.txt" in parts["mpifa_headline"]["setting"]["ood_evaluation"]
    assert any("2:4 Wanda" in t for t in parts["mpifa_headline"]["targets"])
    # CHTss LLaMA reached its density; the MLP rows carry accuracies and active neurons
    llama = parts["chtss_llama"]["by_method"]
    assert llama["chtss"]["density_sparse_subset"]["mean"] == pytest.approx(0.3, abs=2e-3)
    assert 0 < parts["chtss_mlp"]["by_method"]["chts"]["test_accuracy"]["mean"] <= 1
    assert parts["chtss_overhead"]["updates"] >= 1
    # SST: the three methods trained on the same token budget, the gap share follows from the ppls
    q = parts["sst_quality"]
    ppl = q["val_ppl"]
    assert q["gap_closed"] == pytest.approx((ppl["lora"] - ppl["sst"]) / (ppl["lora"] - ppl["full"]))
    assert {r["method"] for r in parts["sst_cost"]["rows"]} == {"full", "lora", "sst"}
    # end to end: dense vs MPIFA layout vs U V, prefill and decode (the CPU dry run decodes eagerly)
    for name in ("pifa_e2e", "pifa_e2e_decode"):
        e2e = parts[name]
        assert e2e["decode_tokens"] > 0 and e2e["decode_mode"] == "eager"
        assert {(s["dtype"], s["variant"]) for s in e2e["speedups"]} == {
            ("float32", "mpifa@0.5"),
            ("float32", "lowrank@0.5"),
        }
        assert [r["dtype"] for r in e2e["pifa_vs_lowrank"]] == ["float32"]
        assert set(e2e["targets"]) == {
            "MPIFA >= 1.4x dense, end-to-end prefill at 0.5",
            "MPIFA >= 1.3x dense, decode at 0.5",
        }
    # the log and the summary table
    log = (out / "gpu_suite.log").read_text()
    assert all(f"== {name}" in log for name in suite.PART_NAMES)
    table = (out / "gpu_suite.md").read_text()
    assert all(f"| {name} |" in table for name in suite.PART_NAMES)


@pytest.mark.slow
def test_second_run_reuses_finished_parts_from_the_state_folder(dry_run, tmp_path):
    _, _, state = dry_run
    payload = load_bench("gpu_suite").main(
        [
            "--dry-run",
            "--output-dir",
            str(tmp_path),
            "--state-dir",
            str(state),
            "--parts",
            "pifa_layers,sst_cost",
        ]
    )
    first = json.loads((state / "state.json").read_text())
    assert list(payload["parts"]) == ["pifa_layers", "sst_cost"]
    for name, key in (("pifa_layers", "prefill"), ("sst_cost", "rows")):
        entry = payload["parts"][name]
        assert entry["status"] == "reused" and entry["reused_from"] == first[name]["date"]
        assert entry[key] == first[name][key]  # the saved numbers, not a new measurement


@pytest.mark.slow
def test_a_part_past_its_cap_is_stopped_and_the_suite_goes_on(tmp_path):
    payload = load_bench("gpu_suite").main(
        [
            "--dry-run",
            "--output-dir",
            str(tmp_path / "out"),
            "--state-dir",
            str(tmp_path / "state"),
            "--parts",
            "chtss_mlp,mpifa_cost_7b",
            "--cap",
            "chtss_mlp=0.5",
        ]
    )
    mlp, cost = payload["parts"]["chtss_mlp"], payload["parts"]["mpifa_cost_7b"]
    assert mlp["status"] == "timeout" and mlp["error"] == "stopped at its cap of 0.5 s"
    assert mlp["seconds"] < 5  # stopped, not run to the end
    assert cost["status"] == "ok" and "row" in cost
    # a stopped part is not reused: the next run does it again
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert "chtss_mlp" not in state and "mpifa_cost_7b" in state


def test_no_part_starts_once_the_budget_is_spent(tmp_path):
    payload = load_bench("gpu_suite").main(
        ["--dry-run", "--output-dir", str(tmp_path), "--state-dir", str(tmp_path / "s"), "--budget", "0"]
    )
    assert {e["status"] for e in payload["parts"].values()} == {"skipped"}
    reasons = [e["reason"] for e in payload["parts"].values()]
    assert all("budget spent" in r or "mt_" in r or "not importable" in r for r in reasons)
    assert json.loads((tmp_path / "gpu_suite.json").read_text())["parts"].keys() == payload["parts"].keys()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_the_gpu_run_refuses_to_start_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA device.*--dry-run"):
        load_bench("gpu_suite").main(["--output-dir", str(tmp_path)])


def test_gguf_pieces_join_back_exactly_and_a_wrong_or_missing_piece_is_an_error(tmp_path):
    suite = load_bench("gpu_suite")
    src = tmp_path / "model.gguf"
    src.write_bytes(os.urandom(1000))
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    pieces = [tmp_path / "a" / "model.gguf.0", tmp_path / "b" / "model.gguf.1"]
    suite.split_file(src, pieces, 300)
    assert [p.stat().st_size for p in pieces] == [300, 700]
    joined = suite.join_pieces(pieces, tmp_path / "out" / "model.gguf", sha, 1000)
    assert joined.read_bytes() == src.read_bytes()
    pieces[1].write_bytes(os.urandom(700))  # a piece from another --prepare-carry run
    with pytest.raises(ValueError, match="does not match its manifest"):
        suite.join_pieces(pieces, tmp_path / "out2" / "model.gguf", sha, 1000)
    assert not (tmp_path / "out2" / "model.gguf").exists()
    pieces[0].unlink()  # the first call's folder is gone (the machine was not kept warm)
    with pytest.raises(FileNotFoundError, match="gpu_carry_a"):
        suite.join_pieces(pieces, tmp_path / "out3" / "model.gguf", sha, 1000)


@pytest.mark.slow
def test_suite_imports_without_lm_eval_datasets_evaluate_and_says_why_zero_shot_is_skipped():
    # The GPU machine has none of the three: the suite must import and name what is missing.
    code = (
        "import sys\n"
        "for m in ('lm_eval', 'datasets', 'evaluate'): sys.modules[m] = None\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "import gpu_suite\n"
        "print(gpu_suite._missing_need('lm_eval', False, {}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lm_eval and datasets not importable" in out.stdout


def test_the_parts_before_the_budget_line_fit_the_budget_and_the_gpu_arguments_parse():
    suite = load_bench("gpu_suite")
    names = suite.PART_NAMES
    before = suite.PARTS[: names.index("mpifa_cost_7b") + 1]
    setup_s = 25  # the setup step's estimate (the docstring's table)
    assert setup_s + sum(p.expected_s for p in before) <= suite.DEFAULT_BUDGET_S
    assert names.index("pifa_e2e") < names.index("mpifa_cost_7b") < names.index("pifa_e2e_decode")
    # every GPU command line of the PIFA parts is accepted by bench/pifa_speed.py (it stops at the
    # missing device, not at an unknown flag)
    speed = load_bench("pifa_speed")
    for argv in (
        suite.pifa_layers_argv(False),
        suite.pifa_e2e_argv(False, False),
        suite.pifa_e2e_argv(False, True),
    ):
        if torch.cuda.is_available():
            continue
        with pytest.raises(SystemExit, match="no CUDA device is available"):
            speed.main(argv)
