"""bench/compression_table.py --quick: every §1 row through leanformers.compress at two densities, the
conversion and MiniLM checks, the zero-shot cells in resumable chunks, and the rows file's checks."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import load_bench


@pytest.mark.slow
def test_quick_run_writes_every_row_and_prints_the_table_last(run_bench, tmp_path, capsys):
    png = tmp_path / "ppl.png"
    result, out = run_bench("compression_table", "--plot", str(png))
    saved = json.loads(out.read_text())
    assert result["cells"] == saved["cells"]  # main returns what it wrote
    low = ["svd", "asvd", "svdllm_whiten", "svdllm_u", "pifa_only", "mpifa"]
    expected = {("dense", 1.0), ("wanda24", 0.5), ("sparsegpt24", 0.5)} | {
        (r, d) for r in low for d in (0.5, 0.8)
    }
    assert {(c["row"], c["density"]) for c in saved["cells"]} == expected
    for c in saved["cells"]:
        assert c["ppl"] > 1 and c["predicted_tokens"] == 16 * 127 and c["stored_bytes"] > 0
        if c["row"] != "dense":  # every compressed row within its parameter budget, and near it
            assert 0.9 * c["density"] <= c["achieved_density"] <= c["density"] + 1e-9, c
    fp32 = next(c for c in saved["conversion"] if c["dtype"] == "float32")
    assert fp32["change %"] < 0.01  # PIFA of the same factors is the same function in fp32
    assert {(m["row"], m["density"]) for m in saved["minilm"]} == {
        (r, d) for r in ("svd", "svdllm_whiten", "mpifa") for d in (0.5, 0.8)
    }
    assert all(0.5 < m["mean cosine"] <= 1.0001 for m in saved["minilm"])
    assert any("2:4 Wanda" in t for t in saved["targets"]) and png.stat().st_size > 1000
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert printed[-1].startswith("2:4 SparseGPT") and "ppl @ 0.5" in printed[-11]


def test_rows_are_checked_against_the_method_config(tmp_path, monkeypatch):
    harness, table = load_bench("harness"), load_bench("compression_table")
    monkeypatch.setattr(harness, "ROWS", tmp_path)
    (tmp_path / "compression_table.yaml").write_text("x: {label: x, method: mpifa, shrinkag: 0.1}\n")
    with pytest.raises(ValueError, match=r"row 'x' has unknown key 'shrinkag' \(did you mean shrinkage"):
        harness.load_rows("compression_table", table.row_keys)
    (tmp_path / "compression_table.yaml").write_text("x: {label: x, method: wanda-2:4, alpha: 0.1}\n")
    with pytest.raises(ValueError, match="unknown key 'alpha'"):  # a 2:4 pruner has no alpha
        harness.load_rows("compression_table", table.row_keys)


def test_result_file_replaces_only_the_cells_it_carries(tmp_path):
    harness = load_bench("harness")
    store = harness.ResultFile(tmp_path / "r.json", merge=False)
    key = load_bench("compression_table").KEYS["cells"]
    store.update(
        "cells",
        [{"row": "svd", "density": 0.8, "ppl": 3.0}, {"row": "mpifa", "density": 0.8, "ppl": 2.0}],
        key,
    )
    merged = harness.ResultFile(tmp_path / "r.json").update(
        "cells",
        [{"row": "mpifa", "density": 0.8, "ppl": 1.5}, {"row": "mpifa", "density": 0.5, "ppl": 4}],
        key,
        x=1,
    )
    assert sorted((c["row"], c["density"], c["ppl"]) for c in merged["cells"]) == [
        ("mpifa", 0.5, 4),
        ("mpifa", 0.8, 1.5),
        ("svd", 0.8, 3.0),
    ]
    assert merged["x"] == 1 == json.loads((tmp_path / "r.json").read_text())["x"]


@pytest.mark.slow
@pytest.mark.integration
def test_zero_shot_cells_are_scored_in_chunks_and_resume(run_bench, capsys):
    pytest.importorskip("lm_eval")
    args = ("--zero-shot", "--rows", "dense", "mpifa_0.8", "--tasks", "piqa", "--limit", "3", "--chunk", "2")
    result, out = run_bench("compression_table", *args)
    cells = result["rows"]
    assert set(cells) == {"dense", "mpifa_0.8"} and result == json.loads(out.read_text())
    for cell in cells.values():
        assert [c["n"] for c in cell["chunks"]["piqa"]] == [2, 1] and cell["tasks"]["piqa"]["n"] == 3
    assert 0.75 <= cells["mpifa_0.8"]["achieved_density"] <= 0.8
    again, _ = run_bench("compression_table", *args, "--merge")  # finished chunks are not scored again
    assert again["rows"]["mpifa_0.8"]["chunks"] == cells["mpifa_0.8"]["chunks"]
    table, _ = run_bench("compression_table", "--zero-shot", "--markdown")
    assert "| MPIFA 0.8 | " in capsys.readouterr().out and table["rows"] == again["rows"]
