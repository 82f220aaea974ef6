"""Loading a compressed checkpoint never builds the dense weights of the compressed linears (issue 21).

The quantizer swaps the listed modules for empty compressed layers while the model still sits on the
meta device. Pinned three ways: the swap sees only meta parameters; the checkpoint holds no tensor of a
compressed linear's dense (out, in) shape; and a TorchDispatchMode records every tensor an aten op
returns on a real device during ``from_pretrained`` (every loading path), none of which may have such a
shape. The tiny model's dims are chosen so that no other tensor has one, and the same recorder does see
them where dense weights are built (from_config) or converted (a dense checkpoint loaded in bf16).
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoConfig, AutoModelForCausalLM

from leanformers.storage.integration import compressed_modules
from leanformers.storage.layers import LowRankLinear, PIFALinear
from leanformers.storage.quantizer import MPIFAHfQuantizer
from leanformers.storage.saving import save_compressed
from tests.tiny_models import llama_config, random_ids

# hidden 48, MLP 80, 4 heads / 2 KV heads (k/v 24 x 48), vocab 128: no other tensor is (48, 48),
# (24, 48), (80, 48) or (48, 80)
CONFIG = {"hidden": 48, "intermediate": 80, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 128}


class DenseShapeRecorder(TorchDispatchMode):
    """Records (op, shape) of every tensor an aten op returns off the meta device with one of ``shapes``."""

    def __init__(self, shapes: set[tuple[int, int]]) -> None:
        super().__init__()
        self.shapes = shapes
        self.hits: list[tuple[str, tuple[int, ...]]] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and tuple(t.shape) in self.shapes:
                self.hits.append((str(func), tuple(t.shape)))
        return out


def _tiny_model(seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    c = CONFIG
    cfg = llama_config(
        c["hidden"], c["intermediate"], c["layers"], c["heads"], c["kv_heads"], vocab=c["vocab"]
    )
    cfg.tie_word_embeddings = False
    return LlamaForCausalLM(cfg).eval()


def _targets(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The dense checkpoint, and the same model with every block linear compressed (PIFA both forms
    and U V), saved with save_compressed; the compressed model's logits as the reference."""
    root = tmp_path_factory.mktemp("loading")
    model = _tiny_model()
    model.save_pretrained(root / "dense")
    shapes = {(m.out_features, m.in_features) for m in _targets(model).values()}
    for i, (name, old) in enumerate(_targets(model).items()):
        rank = min(old.weight.shape) // 3
        if i % 3 == 2:
            u, s, vh = torch.linalg.svd(old.weight.detach(), full_matrices=False)
            new = LowRankLinear.from_factors(u[:, :rank] * s[:rank], vh[:rank])
        else:
            new = PIFALinear.from_linear(old, rank, form="row" if i % 3 else "column")
        model.set_submodule(name, new)
    ids = random_ids(2, 10)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    save_compressed(model, None, root / "compressed")
    return {"root": root, "shapes": shapes, "ids": ids, "ref": ref}


def _record_load(folder, shapes, **kwargs):
    # A dispatch mode is thread-local: load on this thread (transformers' loader threads off) so that
    # the recorder sees every op of the load.
    recorder = DenseShapeRecorder(shapes)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")
        with recorder:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return model, recorder


def test_the_recorder_sees_dense_weights_where_they_are_built_or_converted(folders):
    # the controls: without them, "no hit" could mean the recorder misses what from_pretrained does
    cfg = AutoConfig.from_pretrained(folders["root"] / "dense")
    with DenseShapeRecorder(folders["shapes"]) as built:
        AutoModelForCausalLM.from_config(cfg)  # dense init on the CPU
    assert {shape for _, shape in built.hits} == folders["shapes"]
    model, converted = _record_load(folders["root"] / "dense", folders["shapes"], dtype=torch.bfloat16)
    assert {shape for _, shape in converted.hits} == folders["shapes"]  # fp32 file -> bf16 weights
    assert all(isinstance(m, nn.Linear) for m in _targets(model).values())


def test_the_checkpoint_holds_no_dense_targeted_tensor(folders):
    with safe_open(str(folders["root"] / "compressed" / "model.safetensors"), "pt") as f:
        shapes = {tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert not shapes & folders["shapes"]


def test_the_quantizer_swaps_the_layers_while_the_model_is_on_meta(folders, monkeypatch):
    seen = []
    original = MPIFAHfQuantizer._process_model_before_weight_loading

    def spy(self, model, **kwargs):
        out = original(self, model, **kwargs)
        seen.extend(p.device.type for m in compressed_modules(model).values() for p in m.parameters())
        return out

    monkeypatch.setattr(MPIFAHfQuantizer, "_process_model_before_weight_loading", spy)
    AutoModelForCausalLM.from_pretrained(folders["root"] / "compressed")
    assert seen and set(seen) == {"meta"}


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"low_cpu_mem_usage": True}, {"device_map": "auto"}, {"dtype": torch.bfloat16}],
    ids=["default", "low_cpu_mem_usage", "device_map_auto", "bf16"],
)
def test_loading_a_compressed_checkpoint_never_builds_dense_targeted_weights(folders, kwargs):
    model, recorder = _record_load(folders["root"] / "compressed", folders["shapes"], **kwargs)
    assert recorder.ops > 0  # the load ran under the recorder
    assert recorder.hits == []
    layers = compressed_modules(model)
    assert len(layers) == 2 * 7
    assert {type(m) for m in layers.values()} == {PIFALinear, LowRankLinear}
    for layer in layers.values():
        assert all(tuple(p.shape) not in folders["shapes"] for p in layer.parameters())
        assert all(p.device.type == "cpu" for p in layer.parameters())
    with torch.no_grad():
        logits = model(input_ids=folders["ids"]).logits
    if "dtype" in kwargs:
        assert float((logits.float() - folders["ref"]).norm() / folders["ref"].norm()) < 0.05
    else:  # exact reload whichever loading path
        assert torch.equal(logits, folders["ref"])
