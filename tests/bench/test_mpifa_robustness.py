"""bench/mpifa_robustness.py: the --quick run (tiny LLaMA, byte ids of the real texts)."""

import json

from tests.bench.conftest import load_bench


def test_quick_run_writes_every_row_on_five_texts_and_merges(run_bench, capsys):
    rows = ["dense", "wanda24", "sparsegpt24", "paper", "shrink", "spectrum", "mix_code", "svd", "asvd"]
    result, out = run_bench("mpifa_robustness", "--rows", *rows)
    saved = json.loads(out.read_text())
    assert saved["cells"] == result["cells"]
    assert [c["row"] for c in saved["cells"]] == rows  # in the table's order
    texts = {"ted", "torch", "wiki", "shakespeare", "stdlib"}
    for c in saved["cells"]:
        assert set(c["ppl"]) == texts and all(v["ppl"] > 1 and v["tokens"] > 0 for v in c["ppl"].values())
        if c["row"] not in ("dense", "wanda24", "sparsegpt24"):
            assert 0.4 < c["achieved_density"] <= 0.5, c
    by = {c["row"]: c for c in saved["cells"]}
    assert by["shrink"]["config"]["shrinkage"] == 0.1 and by["spectrum"]["config"]["allocation"] == "spectrum"
    assert by["mix_code"]["calibration"] == "mix_code"
    # the two 2:4 pruners differ only in how they choose and compensate: same windows, other weights
    assert by["sparsegpt24"]["ppl"]["wiki"]["ppl"] != by["wanda24"]["ppl"]["wiki"]["ppl"]
    # compression changes the function: a row identical to dense would mean nothing was compressed
    assert by["paper"]["ppl"]["wiki"]["ppl"] != by["dense"]["ppl"]["wiki"]["ppl"]
    # --merge adds cells without dropping the others
    load_bench("mpifa_robustness").main(["--quick", "--rows", "alpha1", "--merge", "--output", str(out)])
    merged = json.loads(out.read_text())
    assert [c["row"] for c in merged["cells"]] == [*rows[:4], "alpha1", *rows[4:]]
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("asvd")
