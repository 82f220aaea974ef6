"""Model walking, chain removal, head groups, bit-packing and mask I/O."""

from __future__ import annotations

import pytest
import torch

from leanformers.chts.config import DEFAULT_TARGETS
from leanformers.chts.masks import (
    active_neurons,
    apply_masks,
    chain_removal,
    find_sparse_layers,
    load_masks,
    pack_mask,
    save_masks,
    split_count,
    unpack_mask,
)
from leanformers.chts.mlp import MLP_TARGETS, MLPClassifier
from tests.tiny_models import tiny_gpt2, tiny_llama


def test_default_targets_on_llama_leave_embeddings_norms_and_head_dense():
    model = tiny_llama()
    layers = find_sparse_layers(model, DEFAULT_TARGETS, ("lm_head", "embed"))
    names = [layer.name for layer in layers]
    assert len(names) == 2 * 7
    assert all(
        n.split(".")[-1] in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        for n in names
    )
    assert {layer.role for layer in layers} == {"q", "k", "v", "o", "gate", "up", "down"}


def test_targets_matching_nothing_fail_with_the_module_names():
    with pytest.raises(ValueError, match=r"match no nn.Linear.*layers\.0.*CHTssConfig\(targets="):
        find_sparse_layers(MLPClassifier((8, 4, 2)), DEFAULT_TARGETS)


def test_gpt2_conv1d_is_handled_transposed():
    model = tiny_gpt2()
    layers = find_sparse_layers(model, (r"c_fc$",))
    assert len(layers) == 2 and all(layer.transposed for layer in layers)
    assert layers[0].shape == (256, 64)  # (out, in) although Conv1D stores (in, out)


def test_head_groups_roundtrip_and_gqa_sizes():
    model = tiny_llama()
    layers = {
        lay.name.split(".")[-1]: lay
        for lay in find_sparse_layers(model, DEFAULT_TARGETS, (), balance_heads=True)
    }
    assert layers["q_proj"].groups == 4 and layers["k_proj"].groups == 2 and layers["o_proj"].groups == 4
    assert layers["o_proj"].group_dim == 1 and layers["gate_proj"].groups == 1
    for lay in layers.values():
        x = torch.randn(lay.shape)
        assert torch.equal(lay.from_groups(lay.to_groups(x)), x)
    # o_proj groups are column blocks of head_dim = 16.
    o = layers["o_proj"]
    x = torch.zeros(o.shape)
    x[:, 16:32] = 1
    assert o.to_groups(x).sum(1).tolist() == [0, 64 * 16, 0, 0]


def test_chain_removal_on_an_mlp_drops_dead_neurons_until_none_is_left():
    model = MLPClassifier((6, 5, 4, 3))
    layers = find_sparse_layers(model, MLP_TARGETS)
    m0 = torch.ones(5, 6, dtype=torch.bool)
    m1 = torch.ones(4, 5, dtype=torch.bool)
    m2 = torch.ones(3, 4, dtype=torch.bool)
    m1[:, 2] = False  # hidden-1 neuron 2 has no outgoing link -> its inputs go
    m2[:, 3] = False  # hidden-2 neuron 3 has no outgoing link -> its inputs go
    m0[4] = False  # hidden-1 neuron 4 has no incoming link -> its outgoing links go
    out = chain_removal([m0, m1, m2], layers)
    assert not out[0][2].any() and not out[1][3].any() and not out[1][:, 4].any()
    assert out[0].sum() == 6 * 3 and out[2].sum() == 3 * 3
    # Fixed point: a second pass changes nothing.
    again = chain_removal(out, layers)
    assert all(torch.equal(a, b) for a, b in zip(out, again))


def test_chain_removal_is_swiglu_aware():
    model = tiny_llama(layers=1)
    layers = find_sparse_layers(model, (r"mlp\.(gate|up|down)_proj$",))
    gate, up, down = (torch.ones(lay.shape, dtype=torch.bool) for lay in layers)
    gate[3] = False  # silu(0) * up = 0: neuron 3 is dead
    down[:, 7] = False  # neuron 7 feeds nothing
    out = chain_removal([gate, up, down], layers)
    for j in (3, 7):
        assert not out[0][j].any() and not out[1][j].any() and not out[2][:, j].any()
    assert out[1].sum() == (96 - 2) * 64


def test_active_neurons_and_split_count():
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = True
    assert active_neurons(mask) == (0.5, 0.4)
    assert split_count(10, 4).tolist() == [3, 3, 2, 2]


def test_bit_packing_roundtrip_odd_sizes():
    mask = torch.rand(13, 7) < 0.4
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (13 * 7 + 7) // 8
    assert torch.equal(unpack_mask(packed, (13, 7)), mask)


def test_save_load_apply_masks(tmp_path):
    model = MLPClassifier((8, 6, 3))
    masks = {"layers.0": torch.rand(6, 8) < 0.5, "layers.2": torch.rand(3, 6) < 0.5}
    save_masks(tmp_path, masks)
    loaded = load_masks(tmp_path)
    assert all(torch.equal(loaded[k], masks[k]) for k in masks)
    apply_masks(model, loaded)
    assert (model.layers[0].weight[~masks["layers.0"]] == 0).all()
    with pytest.raises(FileNotFoundError, match="no CHTss masks"):
        load_masks(tmp_path / "nothing")
    with pytest.raises(ValueError, match="masks name modules the model does not have"):
        apply_masks(model, {"layers.7": masks["layers.0"]})
