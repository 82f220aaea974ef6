import pytest
import torch
from torch import nn

from leanformers.storage.layers import LowRankLinear, PIFALinear, module_from_spec
from leanformers.storage.pifa_linear import auto_form, emit_in_order_
from leanformers.storage.rank import pifa_num_params
from tests.helpers import rel_error
from tests.tiny_models import random_ids, tiny_llama


def _factors(m, n, r, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(m, r, generator=g).to(dtype),
        torch.randn(r, n, generator=g).to(dtype),
        torch.randn(m, generator=g).to(dtype),
    )


@pytest.mark.parametrize("form", ["row", "column"])
@pytest.mark.parametrize("m,n,r", [(48, 32, 12), (32, 80, 20), (40, 40, 40), (24, 24, 1)])
def test_forward_equals_dense_and_adds_bias(form, m, n, r):
    U, V, b = _factors(m, n, r)
    layer = PIFALinear.from_factors(U, V, b, form=form)
    x = torch.randn(3, 5, n)
    ref = x.double() @ (U.double() @ V.double()).T + b.double()
    y = layer(x)
    assert y.shape == (3, 5, m)
    assert rel_error(y, ref) < 1e-5
    assert rel_error(layer.to_dense()(x), ref) < 1e-5
    no_bias = PIFALinear.from_factors(U, V, None, form=form)
    assert torch.allclose(y - no_bias(x), b.expand_as(y), atol=1e-4)  # the bias really is added
    assert layer.num_parameters == pifa_num_params(m, n, r)
    assert layer.index_bytes == 4 * (m if form == "row" else n)


def test_auto_form_gathers_the_smaller_side():
    assert auto_form(11008, 4096) == "column"  # tall: gather the 4096-wide input
    assert auto_form(4096, 11008) == "row"  # wide: gather the 4096-wide output
    assert auto_form(64, 64) == "column"
    U, V, _ = _factors(30, 10, 4)
    assert PIFALinear.from_factors(U, V).form == "column"
    U, V, _ = _factors(10, 30, 4)
    assert PIFALinear.from_factors(U, V).form == "row"


@pytest.mark.parametrize("kind", ["pifa-row", "pifa-column", "lowrank"])
def test_state_dict_reload_into_a_layer_built_from_spec_on_meta(kind):
    U, V, b = _factors(36, 20, 8)
    if kind == "lowrank":
        layer = LowRankLinear.from_factors(U, V, b)
    else:
        layer = PIFALinear.from_factors(U, V, b, form=kind.split("-")[1])
    spec = layer.spec()
    assert spec["kind"] == kind.split("-")[0] and spec["rank"] == 8 and spec["bias"] is True
    empty = module_from_spec(spec, device="meta")
    assert all(p.device.type == "meta" for p in empty.parameters())
    empty = empty.to_empty(device="cpu")
    empty.load_state_dict(layer.state_dict())
    x = torch.randn(4, 20)
    assert torch.equal(empty(x), layer(x))
    assert empty.spec() == spec
    # the stored pivot block is named `weight` with a shape that is NOT the dense (36, 20): the load guard
    assert tuple(layer.weight.shape) != (36, 20)
    if kind != "lowrank":
        index = layer.state_dict()["output_index" if kind == "pifa-row" else "input_index"]
        assert index.dtype == torch.int32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", ["row", "column"])
def test_half_precision_forward(dtype, form):
    U, V, b = _factors(64, 48, 16)
    ref = PIFALinear.from_factors(U, V, b, form=form)
    half = PIFALinear.from_factors(U, V, b, form=form, dtype=dtype)
    assert half.weight.dtype == dtype and half._index.dtype == torch.int32
    x = torch.randn(7, 48)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert rel_error(half(x.to(dtype)), ref(x)) < tol


@pytest.mark.parametrize("form", ["row", "column"])
def test_gradients_reach_the_factors(form):
    U, V, b = _factors(20, 16, 6)
    layer = PIFALinear.from_factors(U, V, b, form=form)
    layer(torch.randn(5, 16)).pow(2).sum().backward()
    for p in (layer.weight, layer.coeff, layer.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", ["pifa-row", "pifa-column", "lowrank"])
def test_permute_outputs(cls):
    U, V, b = _factors(24, 16, 5)
    layer = (
        LowRankLinear.from_factors(U, V, b)
        if cls == "lowrank"
        else PIFALinear.from_factors(U, V, b, form=cls.split("-")[1])
    )
    x = torch.randn(3, 16)
    before = layer(x)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    layer.permute_outputs_(order)
    assert torch.allclose(layer(x), before[:, order], atol=1e-5)
    with pytest.raises(ValueError, match="permutation of range\\(24\\)"):
        layer.permute_outputs_(torch.zeros(24, dtype=torch.long))


@pytest.mark.parametrize("producer_kind", ["linear", "pifa", "lowrank"])
def test_scatter_free_mlp_with_contiguous_slices(producer_kind):
    """gate/up emit channels in down_proj's pivot-first order; down reads contiguous slices."""
    torch.manual_seed(0)
    d, f, r = 32, 80, 24
    gate, up = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
    if producer_kind != "linear":
        cls = PIFALinear if producer_kind == "pifa" else LowRankLinear
        gate = cls.from_factors(*_factors(f, d, 16, seed=1)[:2])
        up = cls.from_factors(*_factors(f, d, 16, seed=2)[:2])
    down = PIFALinear.from_factors(*_factors(d, f, r, seed=3), form="column")

    def mlp(x):
        return down(nn.functional.silu(gate(x)) * up(x))

    x = torch.randn(6, d)
    with torch.no_grad():
        before = mlp(x)
        emit_in_order_([gate, up], down)
        after = mlp(x)
    assert down.input_permuted and down.spec()["input_permuted"] is True
    assert rel_error(after, before) < 1e-5
    # the contiguous-slice layer still knows its dense equivalent (w.r.t. its permuted input)
    perm_in = nn.functional.silu(gate(x)) * up(x)
    assert rel_error(down.to_dense()(perm_in), after) < 1e-5
    with pytest.raises(ValueError, match="applied twice"):
        emit_in_order_([gate, up], down)


def test_pifa_and_lowrank_logits_agree_on_a_compressed_tiny_model():
    """Acceptance #5: the same factors as PIFA or as low-rank give the same logits (1e-4 rel, fp32)."""
    model = tiny_llama(seed=0)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    ids = random_ids(2, 16)
    logits = {}
    for kind in ("lowrank", "pifa"):
        m = tiny_llama(seed=0)
        for name in names:
            w = m.get_submodule(name).weight.detach().double()
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            r = min(w.shape) // 2
            U, V = (u[:, :r] * s[:r].sqrt()).float(), (s[:r].sqrt()[:, None] * vh[:r]).float()
            new = LowRankLinear.from_factors(U, V) if kind == "lowrank" else PIFALinear.from_factors(U, V)
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent), child, new)
        with torch.no_grad():
            logits[kind] = m(ids).logits
    assert rel_error(logits["pifa"], logits["lowrank"]) < 1e-4


def test_constructor_and_spec_errors():
    with pytest.raises(ValueError, match="rank must be in \\[1, min\\(in_features, out_features\\)"):
        PIFALinear(16, 8, 9)
    with pytest.raises(ValueError, match="form must be 'row' or 'column'"):
        PIFALinear(16, 8, 4, form="diag")
    with pytest.raises(ValueError, match="input_permuted=True needs form='column'"):
        PIFALinear(16, 8, 4, form="row", input_permuted=True)
    with pytest.raises(ValueError, match="unknown module kind 'sparse'"):
        module_from_spec({"kind": "sparse"})
    with pytest.raises(ValueError, match="lacks \\['rank'\\]"):
        module_from_spec({"kind": "pifa", "in_features": 4, "out_features": 4, "bias": False, "form": "row"})
    with pytest.raises(ValueError, match="cannot build a 'lowrank' layer"):
        LowRankLinear.from_spec(PIFALinear(8, 8, 2).spec())
    with pytest.raises(ValueError, match="consumer must be a column-form PIFALinear"):
        emit_in_order_([nn.Linear(4, 8)], PIFALinear(8, 4, 2, form="row"))
    with pytest.raises(ValueError, match="bias must have shape \\(6,\\)"):
        PIFALinear.from_factors(torch.randn(6, 2), torch.randn(2, 5), torch.randn(5))


def test_lora_adapter_on_pifa_layers_trains():
    """PEFT LoRA on top of PIFALinear (registered as a custom module) trains and leaves the factors frozen."""
    from peft import LoraConfig, get_peft_model

    from leanformers.storage.peft_bridge import enable_peft_lora

    model = tiny_llama(seed=0, layers=1)
    attn = model.model.layers[0].self_attn
    attn.q_proj = PIFALinear.from_linear(attn.q_proj, 8)
    attn.v_proj = PIFALinear.from_linear(attn.v_proj, 8)
    peft_model = get_peft_model(model, enable_peft_lora(LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
    ids = random_ids(2, 8)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    trained = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, PIFALinear)


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["row", "column"])
def test_cuda_graph_and_compile(form):
    dev = torch.device("cuda")
    U, V, b = (t.to(dev) for t in _factors(256, 192, 64))
    layer = PIFALinear.from_factors(U, V, b, form=form, dtype=torch.float16)
    x = torch.randn(4, 192, device=dev, dtype=torch.float16)
    eager = layer(x)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        out = compiled(x)
    assert rel_error(out.float(), eager.float()) < 1e-3
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer(static_x)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    assert rel_error(static_y.float(), layer(static_x).float()) < 1e-3
