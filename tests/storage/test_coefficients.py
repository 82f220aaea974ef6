"""Storage dtype of the PIFA coefficients C in 16-bit models (``coefficient_dtype``): kept through
``.to()``, save_compressed and ``from_pretrained(dtype=...)``, and closer to fp32 than all-bf16."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from leanformers import MPIFAQuantizationConfig, PIFALinear, save_compressed, set_coefficient_dtype_
from leanformers.storage.coefficients import AUTO_COEFFICIENT_DTYPE, coefficient_storage_dtype
from leanformers.storage.integration import compressed_modules
from tests.storage.test_quantizer import compress_randomly
from tests.tiny_models import random_ids, tiny_llama

BF16 = torch.bfloat16
AUTO_BF16 = AUTO_COEFFICIENT_DTYPE[BF16]
SAFETENSORS_NAME = {torch.float16: "F16", torch.float32: "F32"}


def _layer(form: str, seed: int = 0, m: int = 96, n: int = 80, r: int = 32) -> PIFALinear:
    g = torch.Generator().manual_seed(seed)
    U, V = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g) / n**0.5
    return PIFALinear.from_factors(U, V, torch.randn(m, generator=g), form=form)


def _pifa_coeffs(model) -> dict[str, torch.Tensor]:
    return {n: m.coeff for n, m in compressed_modules(model).items() if isinstance(m, PIFALinear)}


def test_storage_rule():
    assert AUTO_BF16 != BF16  # the default for bf16 models is not the all-bf16 storage
    assert coefficient_storage_dtype(BF16) == AUTO_BF16
    assert coefficient_storage_dtype(BF16, "same") == BF16
    assert coefficient_storage_dtype(BF16, "float32") == torch.float32
    assert coefficient_storage_dtype(torch.float16, "auto") == torch.float16  # fp16 all: measured fine
    for wide in (torch.float32, torch.float64):  # wide layers always keep C in their own dtype
        assert coefficient_storage_dtype(wide, "float16") == wide
    with pytest.raises(ValueError, match="coefficient_dtype must be one of"):
        coefficient_storage_dtype(BF16, "fp8")


@pytest.mark.parametrize("form", ["row", "column"])
def test_to_bf16_keeps_the_coefficient_dtype_and_converts_from_the_unrounded_value(form):
    layer = _layer(form)
    c32 = layer.coeff.detach().clone()
    half = layer.to(BF16)
    assert half.weight.dtype == BF16 and half.bias.dtype == BF16
    assert half.coeff.dtype == AUTO_BF16
    assert torch.equal(half.coeff, c32.to(AUTO_BF16))  # rounded once, not through bf16
    assert not torch.equal(c32.to(BF16).to(AUTO_BF16), c32.to(AUTO_BF16))  # (which would differ)
    assert half.float().coeff.dtype == torch.float32
    assert half.to(torch.float16).coeff.dtype == torch.float16
    assert layer.to(BF16).set_coefficient_dtype_("same").coeff.dtype == BF16
    assert layer.set_coefficient_dtype_("float32").to(BF16).coeff.dtype == torch.float32


@pytest.mark.parametrize("form", ["row", "column"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_bf16_storage_is_closer_to_fp32_than_all_bf16(form, seed):
    """The stored weights (computed in fp32, so only storage rounding counts) and the bf16 forward."""
    ref = _layer(form, seed)
    x = torch.randn(64, ref.in_features, generator=torch.Generator().manual_seed(9)).to(BF16)
    with torch.no_grad():
        y_ref = ref.double()(x.double())
        errs = {}
        for setting in ("auto", "same"):
            stored = _layer(form, seed).set_coefficient_dtype_(setting).to(BF16)
            w = stored.dense_weight().double()
            w_err = float((w - ref.dense_weight()).norm() / ref.dense_weight().norm())
            emulated = copy.deepcopy(stored).float()(x.float()).double()  # storage rounding only
            y = stored(x)  # the real bf16 forward (C product in fp32 when C is wider)
            assert y.dtype == BF16
            # the forward adds at most the bf16 rounding of activations to the storage error
            assert float((y.double() - emulated).norm() / emulated.norm()) < 8e-3
            errs[setting] = (w_err, float((emulated - y_ref).norm() / y_ref.norm()))
    assert errs["auto"][0] < 0.8 * errs["same"][0], errs
    assert errs["auto"][1] < 0.8 * errs["same"][1], errs


def test_coefficients_that_overflow_float16_are_an_error_not_an_inf():
    layer = _layer("row")
    with torch.no_grad():
        layer.coeff[0, 0] = 1e5
    with pytest.raises(OverflowError, match="coefficient_dtype='float32'"):
        layer.to(BF16)
    kept = layer.set_coefficient_dtype_("float32").to(BF16)
    assert kept.coeff.dtype == torch.float32 and kept.coeff[0, 0] == 1e5


def test_bf16_save_and_from_pretrained_keep_the_coefficients_and_reload_exactly(tmp_path):
    ids = random_ids(2, 12)
    model = compress_randomly(tiny_llama(seed=1)).to(BF16)
    assert _pifa_coeffs(model) and all(c.dtype == AUTO_BF16 for c in _pifa_coeffs(model).values())
    folder = save_compressed(model, None, tmp_path / "bf16")
    assert (
        json.loads((folder / "config.json").read_text())["quantization_config"]["coefficient_dtype"] == "auto"
    )
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys() if k.endswith(".coeff")}  # noqa: SIM118
    assert stored and set(stored.values()) == {SAFETENSORS_NAME[AUTO_BF16]}

    again = AutoModelForCausalLM.from_pretrained(folder, dtype=BF16)
    coeffs = _pifa_coeffs(again)
    assert coeffs.keys() == _pifa_coeffs(model).keys()
    assert all(c.dtype == AUTO_BF16 for c in coeffs.values())
    sd, sd_again = model.state_dict(), again.state_dict()
    assert sd.keys() == sd_again.keys()
    assert all(sd_again[k].dtype == v.dtype and torch.equal(sd_again[k], v) for k, v in sd.items())
    # The rotary tables are not stored: transformers rebuilds them in fp32 on load, where .to(bf16)
    # rounded them (a dense model differs the same way), so the reference takes the rebuilt tables.
    for name, buf in again.model.rotary_emb.named_buffers():
        setattr(model.model.rotary_emb, name, buf.clone())
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)

    # the switch at load time: the all-bf16 storage
    plain = AutoModelForCausalLM.from_pretrained(
        folder, dtype=BF16, quantization_config=MPIFAQuantizationConfig(coefficient_dtype="same")
    )
    assert all(c.dtype == BF16 for c in _pifa_coeffs(plain).values())
    assert plain.config.quantization_config.coefficient_dtype == "same"


def test_fp32_folder_loaded_in_bf16_rounds_the_coefficients_once(tmp_path):
    model = compress_randomly(tiny_llama(seed=2))
    folder = save_compressed(model, None, tmp_path / "fp32")
    half = AutoModelForCausalLM.from_pretrained(folder, dtype=BF16)
    coeffs = _pifa_coeffs(half)
    for name, c32 in _pifa_coeffs(model).items():
        assert coeffs[name].dtype == AUTO_BF16 and torch.equal(coeffs[name], c32.detach().to(AUTO_BF16))
    assert torch.equal(_pifa_coeffs(half.to(BF16)).popitem()[1], coeffs.popitem()[1])  # a no-op cast


def test_save_refuses_mixed_settings_and_records_the_one_used(tmp_path):
    model = compress_randomly(tiny_llama(seed=3))
    first = next(m for m in model.modules() if isinstance(m, PIFALinear))
    first.set_coefficient_dtype_("float32")
    with pytest.raises(ValueError, match="set_coefficient_dtype_"):
        save_compressed(model, None, tmp_path / "mixed")
    set_coefficient_dtype_(model, "float32")
    folder = save_compressed(model.to(BF16), None, tmp_path / "f32")
    assert (
        json.loads((folder / "config.json").read_text())["quantization_config"]["coefficient_dtype"]
        == "float32"
    )
    again = AutoModelForCausalLM.from_pretrained(folder, dtype=BF16)
    assert all(c.dtype == torch.float32 for c in _pifa_coeffs(again).values())
