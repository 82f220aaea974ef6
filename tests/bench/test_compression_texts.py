"""bench/compression_table.py --texts: the --quick run (tiny LLaMA, byte ids of the five real texts)."""

import json
from pathlib import Path

import pytest

from tests.bench.conftest import load_bench


def test_quick_texts_run_writes_every_row_on_five_texts_and_merges(run_bench, capsys):
    rows = ["dense", "wanda24", "sparsegpt24", "paper", "shrink", "spectrum", "mix_code", "svd", "asvd"]
    rows.append("n64")
    result, out = run_bench("compression_table", "--texts", "--rows", *rows)
    saved = json.loads(out.read_text())
    assert saved["cells"] == result["cells"]
    assert [c["row"] for c in saved["cells"]] == rows
    texts = {"ted", "torch", "wiki", "shakespeare", "stdlib"}
    for c in saved["cells"]:
        assert set(c["ppl"]) == texts and all(v["ppl"] > 1 and v["tokens"] > 0 for v in c["ppl"].values())
        assert c["density"] == 0.5 and c["seqlen"] == 32 and c["seed"] == 0
        if c["row"] not in ("dense", "wanda24", "sparsegpt24"):
            assert 0.4 < c["achieved_density"] <= 0.5, c
            assert len(c["calibration_sha256"]) == 64
    by = {c["row"]: c for c in saved["cells"]}
    assert by["shrink"]["config"]["shrinkage"] == 0.1 and by["spectrum"]["config"]["allocation"] == "spectrum"
    assert by["paper"]["config"]["shrinkage"] == 0.0 and by["svd"]["config"]["shrinkage"] == 0.0
    assert by["mix_code"]["calibration"] == "mix_code" and by["paper"]["calibration"] == "wiki"
    # n64: the row's own window count; other windows, so another sha256 than paper's
    assert by["n64"]["nsamples"] == 64 and by["paper"]["nsamples"] == 4
    assert by["n64"]["calibration_sha256"] != by["paper"]["calibration_sha256"]
    assert by["mix_code"]["calibration_sha256"] != by["paper"]["calibration_sha256"]
    # the two 2:4 pruners differ only in how they choose and compensate: same windows, other weights
    assert by["sparsegpt24"]["calibration_sha256"] == by["wanda24"]["calibration_sha256"]
    assert by["sparsegpt24"]["ppl"]["wiki"]["ppl"] != by["wanda24"]["ppl"]["wiki"]["ppl"]
    # compression changes the function: a row identical to dense would mean nothing was compressed
    assert by["paper"]["ppl"]["wiki"]["ppl"] != by["dense"]["ppl"]["wiki"]["ppl"]
    # --merge adds a cell (another seed of a row is another cell) without dropping the others
    ct = load_bench("compression_table")
    ct.main(["--quick", "--texts", "--rows", "paper", "--seed", "1", "--merge", "--output", str(out)])
    merged = json.loads(out.read_text())
    assert [(c["row"], c["seed"]) for c in merged["cells"]] == [*((r, 0) for r in rows), ("paper", 1)]
    assert merged["cells"][-1]["calibration_sha256"] != by["paper"]["calibration_sha256"]
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("paper")


def test_texts_rows_are_refused_outside_texts_and_specs_need_the_tokenizer(tmp_path):
    ct = load_bench("compression_table")
    with pytest.raises(SystemExit, match="--texts"):
        ct.main(["--quick", "--rows", "mix_code", "--output", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match="tokenizer"):
        ct.main(["--quick", "--texts", "--rows", "default", "--default-calib", "self_t1_own",
                 "--output", str(tmp_path / "y.json")])  # fmt: skip


def test_texts_plot_draws_from_the_committed_json_without_a_model(tmp_path):
    png = tmp_path / "ppl.png"
    assert load_bench("compression_table").main(["--texts", "--plot", str(png)]) == {}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    # the picture's default line: every density, one source and one draw of windows, whose 0.5 and 0.8 cells
    # are those of §20's tables run separately (the same windows give the same numbers)
    results = Path(__file__).parents[2] / "bench/results"
    owl = {c["density"]: c for c in json.loads((results / "mpifa_owl_density.json").read_text())["cells"]}
    assert (
        sorted(owl) == [0.5, 0.6, 0.7, 0.8, 0.9] and len({c["calibration_sha256"] for c in owl.values()}) == 1
    )
    for name, density in (("mpifa_owl_shrink_m.json", 0.5), ("mpifa_owl_wide_d08.json", 0.8)):
        (cell,) = [c for c in json.loads((results / name).read_text())["cells"] if c["row"] == "default"]
        same = {t: (v["ppl"], v["tokens"]) for t, v in cell["ppl"].items()}
        assert cell["density"] == density and same == {
            t: (v["ppl"], v["tokens"]) for t, v in owl[density]["ppl"].items()
        }
    # the healed line (OWL defaults, kept at 0.5 and 0.8) and the 2:4 point it is compared with share windows
    cells = json.loads((results / "mpifa_healing_owl_245k.json").read_text())["cells"]
    healed = {c["density"]: c for c in cells if c["row"] == "default" and c.get("heal_tokens")}
    (sparsegpt,) = [c for c in cells if c["row"] == "sparsegpt24_default"]
    assert sorted(healed) == [0.5, 0.8] and all(
        c["config"]["owl"] and c["healing"]["kept"] for c in healed.values()
    )
    assert {c["calibration_sha256"] for c in [*healed.values(), sparsegpt]} == {
        sparsegpt["calibration_sha256"]
    }


@pytest.mark.parametrize(
    ("name", "seed"), [("mpifa_healing_owl_245k.json", 0), ("mpifa_healing_owl_245k_seed1.json", 1)]
)
def test_healing_target_cells_pair_the_healed_model_with_2_4_on_its_own_windows(name, seed):
    """§20's healing table compares healed MPIFA with 2:4 rows of the same calibration windows: every cell of
    a seed's file has one windows hash, the healed cell kept its healing, and the 2:4 rows are not healed."""
    cells = json.loads((Path(__file__).parents[2] / "bench/results" / name).read_text())["cells"]
    at_half = [c for c in cells if c["density"] == 0.5]
    rows = {(c["row"], bool(c.get("heal_tokens"))) for c in at_half}
    assert {("default", True), ("default", False), ("sparsegpt24_default", False)} <= rows
    assert {c["seed"] for c in cells} == {seed} and len({c["calibration_sha256"] for c in at_half}) == 1
    healed = [c for c in at_half if c.get("heal_tokens")]
    assert [c["row"] for c in healed] == ["default"] and healed[0]["healing"]["kept"]
    assert healed[0]["heal_tokens"] == 245760 and healed[0]["config"]["owl"]


def test_healed_cells_at_two_learning_rates_are_two_cells():
    """--merge must not let a healing run at another --heal-lr replace the committed one (same row,
    density, windows, seed and tokens)."""
    text_key = load_bench("compression_table").text_key
    base = {"row": "default", "density": 0.8, "calibration": "self_t1_own", "nsamples": 32, "seqlen": 512}
    rates = ({"settings": {"learning_rate": lr}} for lr in (1e-4, 3e-5))
    healed = [base | {"seed": 0, "heal_tokens": 16384, "healing": h} for h in rates]
    assert text_key(healed[0]) != text_key(healed[1])
    assert text_key(base) == ("default", 0.8, "self_t1_own", 32, 512, 0, 0, None)  # cells before issue 20
    committed = json.loads((Path(__file__).parents[2] / "bench/results/mpifa_calibration.json").read_text())
    keys = [text_key(c) for c in committed["cells"]]
    assert len(keys) == len(set(keys))


def test_target_1b_compares_the_owl_defaults_with_2_4_wanda_at_the_same_size_as_the_docs_say():
    """§20's 128 x 2048 table: the defaults' cell (OWL on) and stop 30's 2:4 Wanda cell share size, seed and
    density, and the ratio row in docs/benchmarks.md is the ratio of the committed perplexities."""
    results = Path(__file__).parents[2] / "bench/results"
    (owl,) = json.loads((results / "mpifa_calibration_2048_owl.json").read_text())["cells"]
    (wanda,) = [
        c
        for c in json.loads((results / "mpifa_calibration_2048.json").read_text())["cells"]
        if c["row"] == "wanda24"
    ]
    shape = ("density", "nsamples", "seqlen", "seed")
    assert [owl[k] for k in shape] == [wanda[k] for k in shape] == [0.5, 128, 2048, 0]
    assert owl["config"]["owl"] and owl["calibration"] == "self_t1_own"
    texts = ("ted", "torch", "wiki", "shakespeare", "stdlib")
    ratios = " | ".join(f"{owl['ppl'][t]['ppl'] / wanda['ppl'][t]['ppl']:.2f}x" for t in texts)
    docs = (Path(__file__).parents[2] / "docs/benchmarks.md").read_text()
    assert f"| {ratios} |" in docs.replace("**", "")
