"""recipes/mt_multi30k.yaml through ``leanformers-train``, tiny: every method trains, reports BLEU / chrF
with sacrebleu's signature, and does what it claims (5 % masks for the sparse rows, one rank for SST and
LoRA). The tiny overrides are the --quick ones of bench/training_table.py's mt_multi30k row (one definition)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from leanformers.recipes import cli
from tests.bench.conftest import load_bench
from tests.helpers import REPO_ROOT

RECIPE = REPO_ROOT / "recipes" / "mt_multi30k.yaml"
SPARSE = ("chtss", "set", "rigl")


@pytest.fixture(scope="module")
def tokenizer_cache(tmp_path_factory):
    """One tokenizer cache for the module: the BPE is trained once, then every run loads it."""
    return tmp_path_factory.mktemp("tokenizers")


def run_cli(method: str, out, cache, capsys) -> dict:
    quick = load_bench("training_table").ROWS["mt_multi30k"]["quick"]["overrides"]
    argv = [
        str(RECIPE),
        "--set",
        *quick,
        f"method.name={method}",
        f"training.output_dir={out}",
        f"tokenizer.cache_dir={cache}",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(printed[printed.index("{\n") :])  # the CLI prints the metrics JSON last
    assert metrics == json.loads((out / "results.json").read_text())
    return metrics


@pytest.mark.parametrize("method", ["dense", *SPARSE, "sst", "lora"])
def test_mt_recipe_reports_bleu_chrf_and_signature(method, tmp_path, tokenizer_cache, capsys, shared_data):
    pytest.importorskip("evaluate")
    import sacrebleu

    metrics = run_cli(method, tmp_path, tokenizer_cache, capsys)
    assert metrics["method"] == method
    assert 0 <= metrics["eval_bleu"] <= 100 and 0 < metrics["eval_chrf"] <= 100
    assert (
        metrics["bleu_signature"]
        == f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
    )
    assert metrics["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")
    # the trained tokenizer travels with the model: final/ reloads as a translation model by itself
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert len(tok) == 400 and tok.decode(tok("Ein Hund läuft.")["input_ids"]) == "Ein Hund läuft."

    if method in SPARSE:
        from leanformers.chts import load_masks

        masks = load_masks(tmp_path)
        assert len(masks) == 2 * 6 + 4  # q/k/v/out + fc1/fc2 per layer, plus the decoder's cross-attention
        weights = load_file(tmp_path / "final" / "model.safetensors")
        for name, mask in masks.items():
            # 5 % of every matrix, up to rounding of the link count
            assert abs(mask.float().mean().item() - 0.05) <= 1 / mask.numel(), name
            assert not weights[f"{name}.weight"][~mask].any(), f"{name}: weights outside the mask"
        assert metrics["chtss/density_sparse_subset"] == pytest.approx(0.05, abs=1e-3)
    else:
        assert not any(key.startswith("chtss/") for key in metrics)


def test_sst_and_lora_rows_train_the_same_layers_at_the_same_rank(
    tmp_path, tokenizer_cache, capsys, shared_data
):
    """SST's claim is against LoRA at equal rank: same r, same adapted matrices (every attention and
    feed-forward linear layer), and fewer trainable parameters than the dense row."""
    pytest.importorskip("evaluate")
    shapes = {}
    trainable = {}
    for method in ("sst", "lora", "dense"):
        metrics = run_cli(method, tmp_path / method, tokenizer_cache, capsys)
        trainable[method] = metrics["trainable_parameters"]
        if method == "dense":
            continue
        config = json.loads((tmp_path / method / "final" / "adapter_config.json").read_text())
        assert config["r"] == 4
        shapes[method] = {
            k: v.shape
            for k, v in load_file(tmp_path / method / "final" / "adapter_model.safetensors").items()
        }

    def layers(keys, marker):
        return {k.split(marker)[0] for k in keys if marker in k}

    sst_vh = {k: s for k, s in shapes["sst"].items() if "sst_Vh_active" in k}
    lora_a = {k: s for k, s in shapes["lora"].items() if "lora_A" in k}
    assert sst_vh and all(s[0] == 4 for s in sst_vh.values())  # r active singular vectors (rows of Vh)
    assert lora_a and all(s[0] == 4 for s in lora_a.values())  # LoRA's A: (r, in)
    assert layers(sst_vh, "sst_Vh_active") == layers(lora_a, "lora_A")
    assert len(sst_vh) == 16
    assert trainable["lora"] < trainable["sst"] < trainable["dense"]
