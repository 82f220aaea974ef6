"""2:4 pruning (wanda-2:4) on tiny models: the pattern, the scores, the block-sequential inputs, and a
checkpoint that reloads without leanformers."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from leanformers import WandaConfig, compress, save_compressed
from leanformers.compression.layout import find_layout, linear_weight
from leanformers.compressors.semistructured import semi_structured_mask
from leanformers.storage.sparsity import check_pattern, parse_pattern, semi_structured_counts
from tests.helpers import run_fresh
from tests.tiny_models import ALL_CAUSAL, random_ids, tiny_llama

CALIB = random_ids(8, 32, seed=1)
CONFIG = WandaConfig(nsamples=8, seqlen=32, batch_size=4)


def test_mask_keeps_the_n_largest_of_every_m():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 6.0, 1.0]])
    assert semi_structured_mask(scores).tolist() == [[True, False, True, False, False, True, True, False]]
    with pytest.raises(ValueError, match="multiple of 4"):
        semi_structured_mask(torch.ones(2, 6))
    assert parse_pattern("2:4") == (2, 4)
    for bad in ("4:2", "2-4", "0:4"):
        with pytest.raises(ValueError, match="N:M pattern"):
            WandaConfig(pattern=bad)


@pytest.mark.parametrize("family", list(ALL_CAUSAL))
def test_every_targeted_linear_holds_two_of_every_four(family):
    dense = ALL_CAUSAL[family]()
    model = copy.deepcopy(dense)
    report = compress(model, None, CONFIG, calibration=CALIB, progress=False)
    layout, blocks = find_layout(model)
    _, dense_blocks = find_layout(dense)
    for block, ref in zip(blocks, dense_blocks):
        for name in layout.modules:
            W, W0 = linear_weight(block.get_submodule(name)), linear_weight(ref.get_submodule(name))
            assert int(semi_structured_counts(W, 4).max()) <= 2
            kept = W != 0
            assert torch.equal(W[kept], W0[kept])  # Wanda never changes a kept weight
    assert report.achieved_density <= 0.5 and report.method == "wanda-2:4"
    assert model.config.sparsity["pattern"] == "2:4" and len(model.config.sparsity["modules"]) == len(
        report.modules
    )


def test_scores_use_the_inputs_of_the_already_pruned_blocks():
    """Block 1's mask is the top-2 of |W| ||X|| with X its inputs after block 0 was pruned (not the dense X)."""
    dense = tiny_llama()
    model = copy.deepcopy(dense)
    compress(model, None, CONFIG, calibration=CALIB, progress=False)
    # inputs of block 1's q_proj in the PRUNED model (block 0 pruned, block 1's attention norm unchanged)
    pruned_inputs = []
    probe = copy.deepcopy(model)
    probe.model.layers[1].load_state_dict(dense.model.layers[1].state_dict())
    handle = probe.model.layers[1].self_attn.q_proj.register_forward_pre_hook(
        lambda m, a: pruned_inputs.append(a[0].detach().reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        for batch in CALIB.split(4):
            probe(input_ids=batch)
    handle.remove()
    X = torch.cat(pruned_inputs).double()
    W0 = dense.model.layers[1].self_attn.q_proj.weight.detach()
    expected = semi_structured_mask(W0.abs() * X.pow(2).sum(0).sqrt().float()[None, :])
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight != 0, expected)


def test_wanda_reads_only_the_gram_diagonal_and_refuses_a_full_gram_as_norms():
    from leanformers.compressors.wanda import wanda_prune_by_norms, wanda_prune_weight

    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(6, 16, generator=g), torch.randn(40, 16, generator=g)
    G = (X.T @ X).double()
    off_diagonal = G + torch.randn(16, 16, generator=g).double()  # Wanda must not read it
    off_diagonal.diagonal().copy_(G.diagonal())
    expected = wanda_prune_by_norms(W, G.diagonal())
    assert torch.equal(wanda_prune_weight(W, G), expected)
    assert torch.equal(wanda_prune_weight(W, off_diagonal), expected)
    with pytest.raises(ValueError, match=r"square_norms must be \(16,\).*wanda_prune_weight"):
        wanda_prune_by_norms(W, G)


def test_saved_folder_reloads_without_leanformers(tmp_path):
    model = tiny_llama()
    compress(model, None, CONFIG, calibration=CALIB, progress=False)
    folder = save_compressed(model, None, tmp_path / "wanda")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["sparsity"]["method"] == "wanda-2:4"
    with torch.no_grad():
        expected = model(input_ids=CALIB[:2]).logits
    torch.save(CALIB[:2], tmp_path / "ids.pt")
    out = run_fresh(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(folder)!r})
        assert "leanformers" not in sys.modules
        with torch.no_grad():
            torch.save(m(input_ids=torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
    """)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected), out


def test_a_weight_that_lost_its_pattern_is_refused_on_save(tmp_path):
    model = tiny_llama()
    compress(model, None, CONFIG, calibration=CALIB, progress=False)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)  # e.g. a fine-tuning step that ignored the mask
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj has 4 non-zeros in a group of 4"):
        check_pattern(model, model.config.sparsity)
    with pytest.raises(ValueError, match="above the recorded 2:4 pattern"):
        save_compressed(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()
