"""Every registered method through the command line: in memory and --stream give the same folder, the
folder reloads (pruned ones without leanformers), and --compare puts them side by side."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from leanformers.compression import COMPRESSORS
from leanformers.compression.cli import main
from leanformers.storage.sparsity import semi_structured_counts
from tests.helpers import mpifa_cli_args, run_fresh

pytestmark = pytest.mark.slow

METHODS = sorted(COMPRESSORS)  # the built-in ones at collection time (a new compressor joins by itself)


def _tensors(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _density_args(method: str) -> list[str]:
    return ["--density", "0.5"] if "density" in COMPRESSORS[method].config_class.field_names() else []


@pytest.mark.parametrize("method", METHODS)
def test_in_memory_and_streamed_write_the_same_folder(method, tiny_lm_folder, shared_data, tmp_path):
    mem, stream = tmp_path / "mem", tmp_path / "stream"
    args = ["--method", method, *_density_args(method)]
    assert main(mpifa_cli_args(tiny_lm_folder, mem, shared_data, *args)) == 0
    assert main(mpifa_cli_args(tiny_lm_folder, stream, shared_data, *args, "--stream")) == 0
    a, b = _tensors(mem), _tensors(stream)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((mem / "config.json").read_text())
    assert config == json.loads((stream / "config.json").read_text())
    card = (mem / "README.md").read_text()
    if "sparsity" in config:  # a pruner: plain weights with exact zeros, the pattern in config and card
        assert "quantization_config" not in config and config["sparsity"]["method"] == method
        targeted = [a[f"{name}.weight"] for name in config["sparsity"]["modules"]]
        assert targeted and all(int(semi_structured_counts(w, 4).max()) <= 2 for w in targeted)
        assert "2:4 semi-structured" in card and "no leanformers needed" in card
    else:  # a low-rank method: factors at about the asked density, through the quantizer
        qc = config["quantization_config"]
        assert qc["quant_method"] == "mpifa" and qc["extra"]["method"] == method
        assert 0.45 <= qc["extra"]["achieved_density"] <= 0.5
        assert "import leanformers" in card


def test_folders_reload_in_a_fresh_process_pruned_ones_without_leanformers(
    tiny_lm_folder, shared_data, tmp_path
):
    folders = {}
    for method in METHODS:
        folders[method] = tmp_path / method.replace(":", "-")
        assert main(mpifa_cli_args(tiny_lm_folder, folders[method], shared_data, "--method", method)) == 0
    pruned = [m for m in METHODS if "sparsity" in json.loads((folders[m] / "config.json").read_text())]
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    out = tmp_path / "logits.pt"
    run_fresh(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        ids, folders, pruned = torch.load({str(tmp_path / "ids.pt")!r}), { ({m: str(f) for m, f in folders.items()})!r}, {pruned!r}
        logits = {{}}
        for m in pruned:  # plain transformers: no leanformers in this process yet
            logits[m] = AutoModelForCausalLM.from_pretrained(folders[m])(input_ids=ids).logits.detach()
        assert "leanformers" not in sys.modules
        import leanformers
        for m in folders:
            if m not in pruned:
                logits[m] = AutoModelForCausalLM.from_pretrained(folders[m])(input_ids=ids).logits.detach()
        torch.save(logits, {str(out)!r})
    """)
    from transformers import AutoModelForCausalLM

    import leanformers  # noqa: F401

    fresh = torch.load(out)
    assert set(fresh) == set(METHODS) and pruned
    for method, folder in folders.items():
        with torch.no_grad():
            here = AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits
        assert torch.equal(fresh[method], here), method


def test_compare_prints_one_table_and_writes_its_json(tiny_lm_folder, shared_data, tmp_path, capsys):
    out = tmp_path / "cmp"
    wiki = str(shared_data / "wikitext-2-raw-test.txt")
    methods = "mpifa,svd-llm,wanda-2:4"
    args = ["--method", methods, "--compare", "--eval", wiki, "--eval-seqlen", "64", "--eval-tokens", "512"]
    assert main(mpifa_cli_args(tiny_lm_folder, out, shared_data, *args, "--density", "0.5")) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "mpifa", "svd-llm", "wanda-2:4"]
    assert all(r["perplexity"] > 1 for r in rows.values()) and rows["dense"]["density"] == 1.0
    assert rows["mpifa"]["stored MB"] < rows["dense"]["stored MB"] == rows["wanda-2:4"]["stored MB"]
    assert result["calibration_tokens"] == 4 * 64
    for name in ("mpifa", "svd-llm", "wanda-2-4"):
        assert (out / name / "config.json").is_file()
    header = next(line for line in printed.splitlines() if line.startswith("method"))
    assert "perplexity" in header and "stored MB" in header
    # --density goes to the methods that take it; one no chosen method takes is refused
    assert (
        main(
            mpifa_cli_args(
                tiny_lm_folder, tmp_path / "x", shared_data, "--method", "wanda-2:4", "--alpha", "0.3"
            )
        )
        == 1
    )
    assert "--alpha does not apply to --method wanda-2:4; it is an option of mpifa" in capsys.readouterr().err
    assert main(mpifa_cli_args(tiny_lm_folder, tmp_path / "y", shared_data, "--method", "mpifa,svd")) == 1
    assert "add --compare" in capsys.readouterr().err
