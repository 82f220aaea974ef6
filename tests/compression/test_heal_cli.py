"""``--heal-tokens N`` (issue 20): compress, distil the dense model into the factors, save; refused where
it cannot work (pruning methods, --stream, --compare) before any model work."""

from __future__ import annotations

import json

import torch

from leanformers.compression.cli import main


def test_heal_tokens_heals_and_saves_a_folder_that_reloads(tiny_lm_folder, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import leanformers  # noqa: F401  (the mpifa quantizer)

    monkeypatch.setenv("LEANFORMERS_CACHE", str(tmp_path / "cache"))
    base = [str(tiny_lm_folder), "--calib", "self", "--nsamples", "4", "--seqlen", "32", "--device", "cpu"]
    report = tmp_path / "r.json"
    assert (
        main([*base, "--output", str(tmp_path / "o"), "--heal-tokens", "128", "--report", str(report)]) == 0
    )
    healing = json.loads(report.read_text())["summary"]["healing"]
    assert healing.startswith("128 tokens, 1 steps, KL to the dense model")
    before, after = (float(x) for x in healing.split("model ")[1].split(",")[0].split(" -> "))
    assert after < before
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert model.config.quantization_config.quant_method == "mpifa"
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_heal_tokens_refusals_name_the_fix(tiny_lm_folder, tmp_path, capsys):
    base = [
        str(tiny_lm_folder),
        "--calib",
        "self",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--heal-tokens",
        "64",
    ]
    assert main([*base, "--output", str(tmp_path / "a"), "--method", "wanda-2:4"]) == 1
    assert "wanda-2:4 prunes weights, which are not healed" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "b"), "--stream"]) == 1
    assert "drop --stream" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "c"), "--method", "mpifa,svd", "--compare"]) == 1
    assert "drop --compare" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abc")
