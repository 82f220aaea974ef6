"""What loading a compressed checkpoint checks (storage/validation.py); the user-facing refusals are rows of
the contract table (tests/contract/bad_inputs.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from leanformers import MPIFAConfig, compress, save_compressed
from leanformers.storage.layers import PIFALinear
from leanformers.storage.validation import (
    check_checkpoint_tensors,
    check_gather_indices,
    check_permutation_values,
    check_spec,
    read_safetensors_header,
)
from tests.tiny_models import random_ids, tiny_llama


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_llama()
    compress(model, None, MPIFAConfig(nsamples=4, seqlen=16), random_ids(4, 16), progress=False)
    folder = save_compressed(model, None, tmp_path_factory.mktemp("v") / "m")
    return folder, json.loads((folder / "config.json").read_text())["quantization_config"]["modules"]


def test_specs_are_checked_field_by_field():
    good = PIFALinear(64, 96, 8, form="column").spec()
    check_spec("m", good)
    check_spec("old", {k: v for k, v in good.items() if k != "input_permuted"})  # older writers omit it
    for field, value, fragment in [
        ("bias", "false", "bias must be a JSON bool"),
        ("rank", 8.0, "rank must be a JSON int"),
        ("rank", True, "rank must be a JSON int"),
        ("rank", 65, "rank 65 does not fit a 96 x 64 layer"),
        ("form", "diagonal", "form must be one of"),
        ("stride", 2, "has keys ['stride'] this leanformers does not know"),
    ]:
        with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            check_spec("m", {**good, field: value})
    with pytest.raises(ValueError, match="input_permuted needs the column form"):
        check_spec("m", {**PIFALinear(64, 96, 8, form="row").spec(), "input_permuted": True})


def test_headers_are_read_without_the_data_and_every_tensor_is_accounted_for(saved):
    folder, modules = saved
    files = check_checkpoint_tensors(modules, [folder / "model.safetensors"])
    assert len(files) >= 3 * len(modules)
    header = read_safetensors_header(folder / "model.safetensors")
    assert all(set(v) >= {"dtype", "shape", "data_offsets"} for v in header.values())
    name = "model.layers.1.self_attn.q_proj"
    wrong = {**modules, name: {**modules[name], "rank": modules[name]["rank"] - 1}}
    with pytest.raises(ValueError, match=rf"{name}\.weight: the checkpoint holds F32"):
        check_checkpoint_tensors(wrong, [folder / "model.safetensors"])
    with pytest.raises(ValueError, match="stores \\['bias'\\], which its spec"):
        tensors = load_file(str(folder / "model.safetensors"))
        tensors[f"{name}.bias"] = torch.zeros(modules[name]["out_features"])
        save_file(tensors, str(folder.parent / "extra.safetensors"))
        check_checkpoint_tensors(modules, [folder.parent / "extra.safetensors"])


def test_permutations_are_checked_and_offloaded_indices_read_from_the_file(saved):
    folder, modules = saved
    check_permutation_values("m", "input_index", torch.tensor([2, 0, 1], dtype=torch.int32), 3)
    for bad, fragment in [
        ([0, 0, 1], "0 appears 2 times"),
        ([0, 1, 3], "holds 3, outside 0..2"),
        ([0, -1, 2], "holds -1"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            check_permutation_values("m", "input_index", torch.tensor(bad, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="must be int32"):
        check_permutation_values("m", "input_index", torch.tensor([0, 1, 2]), 3)
    # a model whose indices sit on the meta device (offloaded): they are read from the checkpoint instead
    from transformers import AutoModelForCausalLM

    import leanformers  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(folder)
    files = check_checkpoint_tensors(modules, [folder / "model.safetensors"])
    layer = model.model.layers[0].mlp.down_proj
    layer.input_index = torch.empty(layer.in_features, dtype=torch.int32, device="meta")
    check_gather_indices(model, files)  # the file's index is a permutation: passes without materialising
    assert layer.input_index.device.type == "meta"
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.input_index"][0] = tensors[
        "model.layers.0.mlp.down_proj.input_index"
    ][1]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj.input_index is not a permutation"):
        check_gather_indices(model, files)


def test_offloaded_loading_still_works(tmp_path):
    """device_map with disk offload: the validation neither fails nor pulls offloaded tensors in."""
    from transformers import AutoModelForCausalLM

    import leanformers  # noqa: F401

    model = tiny_llama()
    compress(model, None, MPIFAConfig(nsamples=4, seqlen=16), random_ids(4, 16), progress=False)
    folder = save_compressed(model, None, tmp_path / "m")
    ids = random_ids(1, 8)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        device_map = {
            "model.embed_tokens": "cpu",
            "model.layers.0": "cpu",
            "model.layers.1": "disk",
            "model.norm": "cpu",
            "model.rotary_emb": "cpu",
            "lm_head": "cpu",
        }
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, device_map=device_map, offload_folder=tmp_path / "off"
        )
        layer = loaded.model.layers[1].mlp.down_proj
        assert layer.weight.device.type == "meta"  # offloaded to disk, never pulled in by the validation
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
