"""The MPIFA pipeline on tiny models of every supported family (built from config, no Hub)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leanformers.compression.layout import find_layout
from leanformers.compressors.mpifa import MPIFAConfig, mpifa_compress
from leanformers.storage.layers import LowRankLinear, PIFALinear
from tests.tiny_models import ALL_CAUSAL, VOCAB, random_ids, tiny_bert, tiny_llama

CALIB = random_ids(8, 32, seed=1)
HELD_OUT = random_ids(4, 32, seed=2)

FAMILIES = {**ALL_CAUSAL, "bert": tiny_bert}


def _out(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _compressed_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (PIFALinear, LowRankLinear))}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_rank_without_target_shift_reproduces_the_model(family):
    """density 1 + alpha 0: every layer is an exact PIFA refactorisation, so outputs must match.

    This checks the plumbing end to end: block discovery, kwargs replay (masks, RoPE, GQA), biases,
    Conv1D transposes and module swapping.
    """
    model = FAMILIES[family]()
    reference = _out(model, HELD_OUT)
    layout, blocks = find_layout(model)
    report = mpifa_compress(
        model, None, MPIFAConfig(density=1.0, alpha=0.0, batch_size=4), CALIB, progress=False
    )
    compressed = _compressed_modules(model)
    assert len(compressed) == len(layout.modules) * len(blocks) == len(report.modules)
    got = _out(model, HELD_OUT)
    assert (got - reference).abs().max() <= 1e-3 * reference.abs().max()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_density_budget_and_quantization_config(family):
    model = FAMILIES[family]()
    report = mpifa_compress(model, None, MPIFAConfig(density=0.5, batch_size=4), CALIB, progress=False)
    assert report.achieved_density <= 0.5
    assert report.achieved_density >= 0.45  # tiny 64-wide shapes round coarsely; SmolLM2 is checked to 1 %
    for m in report.modules:  # OWL (the default) gives each block its own density
        assert m.stored_params <= m.target_density * m.dense_params
    qc = model.config.quantization_config
    assert qc.quant_method in ("mpifa", "MPIFA") or str(qc.quant_method).endswith("mpifa")
    modules = dict(_compressed_modules(model))
    assert set(qc.modules) == set(modules)
    for name, spec in qc.modules.items():
        assert spec["rank"] == modules[name].rank
    assert torch.isfinite(_out(model, HELD_OUT)).all()


def _error(model_fn, config):
    dense = model_fn()
    reference = _out(dense, CALIB)
    model = model_fn()
    mpifa_compress(model, None, config, CALIB, progress=False)
    return ((_out(model, CALIB) - reference).norm() / reference.norm()).item()


def test_m_beats_whitening_beats_plain_svd_on_calibration_outputs():
    # Wider than the default tiny model so that a 0.3 density leaves real rank choices.
    def model_fn():
        return tiny_llama(seed=3, hidden=96, intermediate=160)

    svd = _error(model_fn, MPIFAConfig(density=0.3, init="svd", steps=0, output="lowrank", batch_size=4))
    whiten = _error(
        model_fn, MPIFAConfig(density=0.3, init="whiten", steps=0, output="lowrank", batch_size=4)
    )
    m = _error(model_fn, MPIFAConfig(density=0.3, alpha=0.25, steps=2, output="lowrank", batch_size=4))
    mpifa = _error(model_fn, MPIFAConfig(density=0.3, alpha=0.25, steps=2, output="pifa", batch_size=4))
    assert m < whiten < svd
    assert mpifa < m  # PIFA keeps a higher rank at the same density


def test_attention_density_and_owl_keep_the_budget():
    model = tiny_llama(hidden=96, intermediate=160)
    report = mpifa_compress(
        model, None, MPIFAConfig(density=0.5, attn_density=0.7, batch_size=4), CALIB, progress=False
    )
    attn = [m for m in report.modules if "self_attn" in m.name]
    mlp = [m for m in report.modules if "mlp" in m.name]
    assert all(m.target_density == pytest.approx(0.7) for m in attn)
    assert all(m.target_density < 0.5 for m in mlp)
    assert report.achieved_density <= 0.5
    model = tiny_llama(layers=3, hidden=96, intermediate=160)
    report = mpifa_compress(
        model, None, MPIFAConfig(density=0.5, owl=True, owl_lambda=0.1, batch_size=4), CALIB, progress=False
    )
    per_block = {int(m.name.split(".")[2]): m.target_density for m in report.modules}
    assert len(set(per_block.values())) > 1  # OWL differentiates the layers
    assert sum(per_block.values()) / 3 == pytest.approx(0.5, abs=1e-9)
    assert report.achieved_density <= 0.5 + 1e-9


def test_owl_is_on_by_default_wherever_it_applies_and_explicit_settings_win():
    assert MPIFAConfig().owl is True  # whitening init + M steps: the run reads calibration data anyway
    assert MPIFAConfig(init="svd", alpha=0.0, steps=2).owl is True
    # plain SVD reads no calibration data: auto stays off, so it still needs none
    assert MPIFAConfig(init="svd", steps=0).owl is False
    assert not MPIFAConfig(init="svd", steps=0).needs_statistics
    # the other allocations set densities themselves: auto yields to them instead of refusing
    assert MPIFAConfig(attn_density=0.6).owl is False
    assert MPIFAConfig(allocation="spectrum").owl is False
    assert MPIFAConfig(owl=False).owl is False
    # owl_lambda by default: OWL_SPREAD (0.8) of the distance to the nearer of 0 and 1
    assert [MPIFAConfig(density=d).owl_lambda for d in (0.5, 0.8, 0.2)] == [0.4, 0.16, 0.16]  # as recorded
    assert MPIFAConfig(density=0.05, owl_lambda=0.08).owl is False  # no room to differ by 0.08
    assert MPIFAConfig(density=1.0).owl is False  # every block full: nothing to allocate
    with pytest.raises(ValueError, match=r"owl_lambda must lie in \[0, density=0.05\) with owl"):
        MPIFAConfig(density=0.05, owl=True, owl_lambda=0.08)
    with pytest.raises(ValueError, match=r"owl_lambda must lie in \[0, 1\), got 1.5"):
        MPIFAConfig(owl_lambda=1.5)
    with pytest.raises(ValueError, match="choose either owl or attn_density"):
        MPIFAConfig(owl=True, attn_density=0.6)
    with pytest.raises(ValueError, match="drop owl / attn_density"):
        MPIFAConfig(owl=True, allocation="spectrum")


def test_default_config_compresses_with_owl_block_densities_and_records_them():
    model = tiny_llama(layers=3, hidden=96, intermediate=160)
    report = mpifa_compress(model, None, MPIFAConfig(density=0.5, batch_size=4), CALIB, progress=False)
    per_block = {int(m.name.split(".")[2]): m.target_density for m in report.modules}
    assert len(set(per_block.values())) == 3  # OWL: one density per block
    assert max(per_block.values()) - min(per_block.values()) == pytest.approx(2 * 0.4)  # owl_lambda
    assert sum(per_block.values()) / 3 == pytest.approx(0.5, abs=1e-9)
    assert report.achieved_density <= 0.5 + 1e-9
    extra = model.config.quantization_config.extra  # the checkpoint says how its densities were chosen
    assert extra["owl"] is True
    assert {int(k): v for k, v in extra["block_densities"].items()} == pytest.approx(per_block)
    off = mpifa_compress(
        tiny_llama(layers=3, hidden=96, intermediate=160),
        None,
        MPIFAConfig(density=0.5, owl=False, batch_size=4),
        CALIB,
        progress=False,
    )
    assert {m.target_density for m in off.modules} == {0.5}


def test_targets_select_modules():
    model = tiny_llama()
    report = mpifa_compress(
        model, None, MPIFAConfig(density=0.5, targets=["mlp.*"], batch_size=4), CALIB, progress=False
    )
    assert {m.name.rsplit(".", 1)[-1] for m in report.modules} == {"gate_proj", "up_proj", "down_proj"}
    with pytest.raises(ValueError, match=r"targets \['nothing'\] match no module"):
        mpifa_compress(tiny_llama(), None, MPIFAConfig(targets=["nothing"]), CALIB, progress=False)


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\], got 1.5"):
        MPIFAConfig(density=1.5)
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\], got 0"):
        MPIFAConfig(density=0)
    with pytest.raises(ValueError, match="leaves an MLP density"):
        mpifa_compress(tiny_llama(), None, MPIFAConfig(density=0.2, attn_density=1.0), CALIB, progress=False)

    class Mystery(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "mystery"})()
            self.lin = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="could not find the repeated blocks of Mystery.*--blocks-path"):
        mpifa_compress(Mystery(), None, MPIFAConfig(), CALIB, progress=False)

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="block 0: mlp.down_proj has a non-finite weight"):
        mpifa_compress(model, None, MPIFAConfig(density=0.5, batch_size=4), CALIB, progress=False)
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="block 1: non-finite activations"):
        mpifa_compress(model, None, MPIFAConfig(density=0.5, batch_size=4), CALIB, progress=False)


def test_custom_layout_for_an_unknown_architecture():
    """blocks_path/groups let a user compress a model the table does not know."""
    model = tiny_llama()
    model.config.model_type = "my_llama_variant"
    report = mpifa_compress(
        model,
        None,
        MPIFAConfig(
            density=0.5,
            blocks_path="model.layers",
            groups=[["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
            batch_size=4,
        ),
        CALIB,
        progress=False,
    )
    assert len(report.modules) == 3 * len(model.model.layers)


def test_calibration_from_text_checks_token_count(minilm_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = tiny_bert()
    model.resize_token_embeddings(tokenizer.vocab_size)
    with pytest.raises(ValueError, match="too few calibration tokens"):
        mpifa_compress(
            model,
            tokenizer,
            MPIFAConfig(nsamples=4, seqlen=64),
            calibration="just a few words here",
            progress=False,
        )
    text = " ".join(f"word{i} and more text" for i in range(400))
    report = mpifa_compress(
        model, tokenizer, MPIFAConfig(density=0.5, nsamples=4, seqlen=64), calibration=text, progress=False
    )
    assert report.calibration_tokens == 4 * 64


def test_model_dtype_and_device_are_restored():
    model = tiny_llama().to(torch.bfloat16)
    mpifa_compress(model, None, MPIFAConfig(density=0.5, batch_size=4), CALIB, progress=False)
    # everything back in bf16 but the PIFA coefficients, stored in fp16 in a bf16 model by default
    # (pifa/layer.py: coefficient_storage_dtype)
    coeff = {n for n, m in model.named_modules() if isinstance(m, PIFALinear) for n in [f"{n}.coeff"]}
    assert coeff and {p.dtype for n, p in model.named_parameters() if n not in coeff} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if n in coeff} == {torch.float16}
    assert torch.isfinite(_out(model, HELD_OUT).float()).all()
    assert model.config.vocab_size == VOCAB


def test_plain_svd_needs_no_calibration():
    model = tiny_llama()
    report = mpifa_compress(
        model,
        None,
        MPIFAConfig(density=0.5, init="svd", steps=0, output="lowrank"),
        calibration=None,
        progress=False,
    )
    assert report.calibration_tokens == 0 and report.achieved_density <= 0.5
    # each layer is exactly the truncated SVD of its weight
    ref = tiny_llama()
    w = ref.model.layers[0].mlp.down_proj.weight.detach().double()
    r = model.model.layers[0].mlp.down_proj.rank
    U, s, Vh = torch.linalg.svd(w, full_matrices=False)
    best = (U[:, :r] * s[:r]) @ Vh[:r]
    got = model.model.layers[0].mlp.down_proj.to_dense().weight.detach().double()
    assert torch.allclose(got, best, atol=1e-5)
    with pytest.raises(ValueError, match="this compressor needs calibration data"):
        mpifa_compress(tiny_llama(), None, MPIFAConfig(), calibration=None, progress=False)


def _precision_flags() -> tuple:
    cuda = torch.backends.cuda.matmul
    return (
        torch.get_float32_matmul_precision(),
        cuda.fp32_precision,
        torch.backends.mkldnn.matmul.fp32_precision,
    )


@pytest.mark.parametrize("user", ["high", "medium"])
def test_gram_products_run_in_full_precision_and_user_settings_come_back(user):
    """Issue 7: with TF32 ("high") or bf16 ("medium") matmuls enabled by the user, the forwards that feed
    G, K, S and the reconstruction must still run in full precision; the settings return afterwards.
    (CPU has no TF32: the test reads the flags in force inside the pipeline, from a forward hook.)"""
    before = _precision_flags()
    torch.set_float32_matmul_precision(user)
    try:
        user_flags = _precision_flags()
        assert user_flags[0] == user and torch.backends.cuda.matmul.allow_tf32
        model = tiny_llama(seed=3, layers=2)
        seen = []
        hooks = [
            model.model.layers[i].mlp.down_proj.register_forward_pre_hook(
                lambda m, a: seen.append(_precision_flags())
            )
            for i in range(2)
        ]
        mpifa_compress(
            model, None, MPIFAConfig(density=0.5, device="cpu"), calibration=random_ids(4, 16), progress=False
        )
        for h in hooks:
            h.remove()
        assert seen and all(flags == ("highest", "ieee", "ieee") for flags in seen), set(seen)
        assert _precision_flags() == user_flags and torch.backends.cuda.matmul.allow_tf32
        # restored on error too
        from leanformers.compression.precision import full_precision_matmul

        with pytest.raises(KeyError), full_precision_matmul():
            assert _precision_flags() == ("highest", "ieee", "ieee")
            raise KeyError("boom")
        assert _precision_flags() == user_flags
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cuda.matmul.fp32_precision = before[1]
        torch.backends.mkldnn.matmul.fp32_precision = before[2]
    assert _precision_flags() == before


def test_non_finite_inputs_of_a_group_are_caught_from_the_gram_diagonal():
    """The activation check moved from every token to the Gram diagonals: still exact for inf and NaN."""
    from leanformers.compressors.reconstruct import accumulate_grams

    cpu = torch.device("cpu")
    for bad in (float("nan"), float("inf"), -float("inf")):
        states = torch.randn(2, 5, 6)
        states[1, 3, 4] = bad
        for pairs in ([(torch.randn(2, 5, 6), states)], [(states, torch.randn(2, 5, 6))]):
            with pytest.raises(FloatingPointError, match="non-finite activations at the input of q"):
                accumulate_grams(pairs, cpu, need_gram=True, need_cross=True, need_dense=True, name="q")
    stats = accumulate_grams(
        [(torch.randn(2, 5, 6), torch.randn(2, 5, 6))], cpu, need_gram=True, need_cross=True, need_dense=True
    )
    assert stats.tokens == 10 and torch.isfinite(stats.G).all() and stats.K.shape == (6, 6)
    only_s = accumulate_grams(
        [(torch.randn(2, 5, 6), None)], cpu, need_gram=False, need_cross=False, need_dense=True
    )
    assert only_s.G is None and only_s.K is None and only_s.tokens == 10


def test_calibration_mix_of_files_draws_windows_from_each(tmp_path, minilm_path):
    """A ``"a.txt=3,b.txt"`` calibration string (the CLI's --calib) mixes sources by weight; a list of
    (source, weight) pairs is the same mix. Real tokenizer; windows traced back to their file."""
    from transformers import AutoTokenizer

    from leanformers.compression.calibration import calibration_windows_for

    tok = AutoTokenizer.from_pretrained(minilm_path)
    (tmp_path / "a.txt").write_text("alpha beta gamma delta\n" * 200)
    (tmp_path / "b.txt").write_text("uvwxyz\n" * 400)
    config = MPIFAConfig(density=0.5, nsamples=8, seqlen=16)
    windows, label = calibration_windows_for(f"{tmp_path / 'a.txt'}=3,{tmp_path / 'b.txt'}", tok, config)
    assert label.startswith("mix of a.txt x3, b.txt x1: 8 x 16 tokens")
    assert windows.shape == (8, 16)
    b_ids = set(tok("uvwxyz", add_special_tokens=False)["input_ids"])
    from_b = [bool(set(w.tolist()) <= b_ids) for w in windows]
    assert from_b == [False] * 6 + [True] * 2  # 3 : 1 of 8 windows
    listed, same = calibration_windows_for([(tmp_path / "a.txt", 3), tmp_path / "b.txt"], tok, config)
    assert torch.equal(listed, windows) and same == label
