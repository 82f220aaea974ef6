"""The PIFALinear forward against its previous version (issue 21): same outputs, same checkpoints.

``previous_forward`` is the layer's forward as it stood before the per-call overhead was removed, kept
here verbatim as the reference. Where the operations are unchanged (fp32 and every 16-bit setting) the
outputs must be bit-identical, and so must an MPIFA compression, whose pipeline runs this forward on its
compressed stream.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanformers import MPIFAConfig, compress
from leanformers.storage.layers import PIFALinear
from leanformers.storage.pifa_linear import emit_in_order_
from tests.helpers import rel_error
from tests.tiny_models import random_ids, tiny_llama, tiny_qwen2


def previous_forward(self: PIFALinear, x: torch.Tensor) -> torch.Tensor:
    lead = x.shape[:-1]
    cd = torch.promote_types(x.dtype, self.coeff.dtype)
    if self._form == "row":
        z = F.linear(x.reshape(-1, self.in_features), self.weight)
        zc = F.linear(z.to(cd), self.coeff.to(cd)).to(z.dtype)
        y = torch.cat([z, zc], dim=-1).index_select(1, self.output_index)
        y = y.view(*lead, self.out_features)
        return y if self.bias is None else y + self.bias
    x2 = x.reshape(-1, self.in_features)
    if not self.input_permuted:
        x2 = x2.index_select(1, self.input_index)
    r = self._rank
    z = torch.addmm(x2[:, :r].to(cd), x2[:, r:].to(cd), self.coeff.to(cd).t()).to(x2.dtype)
    return F.linear(z, self.weight, self.bias).view(*lead, self.out_features)


def _layer(m, n, r, form, bias, dtype=torch.float32, coefficient_dtype="auto", seed=0):
    g = torch.Generator().manual_seed(seed)
    U, V, b = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g), torch.randn(m, generator=g)
    return PIFALinear.from_factors(
        U, V, b if bias else None, form=form, dtype=dtype, coefficient_dtype=coefficient_dtype
    )


# odd sizes (small-matrix BLAS paths), SmolLM2's k/v and MLP shapes, 1 token (decode) and a prefill
SHAPES = [(100, 37, 13), (37, 100, 13), (192, 576, 97), (576, 1536, 300), (1536, 576, 318)]


@pytest.mark.parametrize("form", ["row", "column", "column-permuted"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_forward_is_bit_identical_to_the_previous_version_in_fp32(form, bias, tokens):
    for m, n, r in SHAPES:
        layer = _layer(m, n, r, form.split("-")[0], bias)
        layer.input_permuted = form == "column-permuted"
        x = torch.randn(2, tokens, n, generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad():
            y = layer(x)
            assert torch.equal(y, previous_forward(layer, x)), (m, n, r)
            assert torch.equal(layer(x[0, -1]), previous_forward(layer, x[0, -1]))  # 1-D input
        assert y.shape == (2, tokens, m) and y.is_contiguous()


@pytest.mark.parametrize("setting", ["auto", "same", "float32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["row", "column"])
def test_forward_is_bit_identical_in_16_bit_and_with_wider_coefficients(dtype, form, setting):
    # bf16 + "auto": C in fp16, its product in fp32 (the mixed path); "float32": C kept in fp32
    layer = _layer(96, 64, 24, form, True, dtype=dtype, coefficient_dtype=setting)
    x = torch.randn(5, 64).to(dtype)
    with torch.no_grad():
        assert torch.equal(layer(x), previous_forward(layer, x))


@pytest.mark.parametrize("form", ["row", "column"])
def test_gradients_equal_the_previous_version(form):
    layers = [_layer(40, 24, 8, form, True) for _ in range(2)]
    x = torch.randn(6, 24)
    layers[0](x).pow(2).sum().backward()
    previous_forward(layers[1], x).pow(2).sum().backward()
    for a, b in zip(layers[0].parameters(), layers[1].parameters()):
        assert torch.equal(a.grad, b.grad)


def test_the_bias_add_never_writes_into_a_shared_tensor():
    layer = _layer(30, 50, 10, "row", True)
    bias_before = layer.bias.detach().clone()
    x = torch.randn(4, 50)
    with torch.no_grad():
        first = layer(x)
        kept = first.clone()
        layer(x)
    assert torch.equal(first, kept) and torch.equal(layer.bias, bias_before)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_mpifa_checkpoint_is_bit_identical_to_the_previous_forward(monkeypatch, factory):
    """MPIFA runs the compressed layers on its compressed stream: the new forward must not change a
    single bit of what it writes. tiny_qwen2 adds GQA and q/k/v biases."""
    config = MPIFAConfig(density=0.5, nsamples=4, seqlen=16, batch_size=2, device="cpu")
    calibration = random_ids(4, 16, seed=1)
    states = []
    for forward in (PIFALinear.forward, previous_forward):
        monkeypatch.setattr(PIFALinear, "forward", forward)
        model = factory(seed=0)
        compress(model, None, config, calibration, progress=False)
        states.append(model.state_dict())
    forms = {m.form for m in model.modules() if isinstance(m, PIFALinear)}
    assert forms == {"row", "column"}  # both forward paths ran on the compressed stream
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_scatter_free_consumer_still_matches_after_emit_in_order():
    torch.manual_seed(0)
    gate, up = nn.Linear(32, 80, bias=False), nn.Linear(32, 80, bias=False)
    down = _layer(32, 80, 24, "column", True)
    x = torch.randn(7, 32)
    with torch.no_grad():
        before = down(F.silu(gate(x)) * up(x))
        emit_in_order_([gate, up], down)
        h = F.silu(gate(x)) * up(x)
        after = down(h)
        assert torch.equal(after, previous_forward(down, h))
    assert rel_error(after, before) < 1e-5
