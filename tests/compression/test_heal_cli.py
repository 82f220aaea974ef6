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
    assert healing.startswith("128 tokens, 1 steps at learning rate 3e-05, KL to the dense model")
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


def test_heal_lr_sets_the_learning_rate_and_is_refused_alone_or_out_of_range(
    tiny_lm_folder, tmp_path, monkeypatch, capsys
):
    """--heal-lr: at high density the default learning rate can raise the KL (docs/benchmarks.md §20), so the
    command line sets it; without --heal-tokens, or <= 0 / nan, it is refused before any model work."""
    monkeypatch.setenv("LEANFORMERS_CACHE", str(tmp_path / "cache"))
    base = [str(tiny_lm_folder), "--calib", "self", "--nsamples", "4", "--seqlen", "32", "--device", "cpu"]
    heal = ["--heal-tokens", "128"]
    for lr, name in (("1e-4", "default"), ("1e-2", "high")):
        report = tmp_path / f"{name}.json"
        assert (
            main([*base, *heal, "--heal-lr", lr, "--output", str(tmp_path / name), "--report", str(report)])
            == 0
        )
    kls = [
        json.loads((tmp_path / f"{n}.json").read_text())["summary"]["healing"] for n in ("default", "high")
    ]
    assert "at learning rate 0.01," in kls[1] and "at learning rate 0.0001," in kls[0]
    assert kls[0].split("KL")[1] != kls[1].split("KL")[1]  # the rate reached the run: another result
    assert main([*base, "--heal-lr", "1e-4", "--output", str(tmp_path / "a")]) == 1
    assert (
        "--heal-lr sets the learning rate of healing, which runs only with --heal-tokens"
        in capsys.readouterr().err
    )
    for bad, said in (("0", "healing learning_rate must be > 0"), ("nan", "learning_rate must be a finite")):
        assert main([*base, *heal, "--heal-lr", bad, "--output", str(tmp_path / "b")]) == 1
        assert said in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
