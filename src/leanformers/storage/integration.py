"""Module swap of the MPIFA format (the ``integrations/<method>.py`` part of a transformers integration):
``replace_with_pifa_layers`` builds empty PIFALinear / LowRankLinear layers from the specs of a
``quantization_config`` (on meta, before the weights load); ``dequantize_model`` turns them back into
the dense modules of the architecture (nn.Linear, or GPT-2's Conv1D)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from leanformers._compat import is_conv1d
from leanformers.storage.layers import CompressedLinear, module_from_spec

__all__ = [
    "COMPRESSED_TYPES",
    "compressed_modules",
    "dense_skeleton",
    "densify_modules",
    "dequantize_model",
    "replace_with_pifa_layers",
    "resolve_module_names",
]

logger = logging.getLogger(__name__)

COMPRESSED_TYPES = (CompressedLinear,)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def resolve_module_names(model: nn.Module, modules: dict[str, dict]) -> dict[str, dict]:
    """``modules`` keyed by names that exist in ``model``.

    A checkpoint written from a model with a head (``LlamaForCausalLM``: ``model.layers.0...``) may be
    loaded into its base model (``AutoModel`` -> ``LlamaModel``: ``layers.0...``) and the other way
    round; transformers maps the weight names with ``base_model_prefix``, so the spec names are mapped
    the same way. A name that resolves neither way is an error naming the module.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    resolved: dict[str, dict] = {}
    for name, spec in modules.items():
        candidates = [name]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1 :])  # head checkpoint -> base model
        if prefix and hasattr(model, prefix):
            candidates.append(f"{prefix}.{name}")  # base checkpoint -> model with a head
        found = next((c for c in candidates if _has_module(model, c)), None)
        if found is None:
            raise ValueError(
                f"the model has no module {name!r} listed in quantization_config.modules: the checkpoint "
                f"was written for another architecture than {type(model).__name__}"
            )
        resolved[found] = spec
    return resolved


def replace_with_pifa_layers(
    model: nn.Module, modules: dict[str, dict], coefficient_dtype: str = "auto"
) -> nn.Module:
    """Swap each named nn.Linear / Conv1D of ``model`` for an empty layer built from its spec, on the
    module's own device and dtype (works on meta); PIFA coefficients stored as ``coefficient_dtype``
    says (see PIFALinear). Modules already of the right layout are kept. Names are resolved with
    ``resolve_module_names`` (head <-> base model prefix)."""
    for name, spec in resolve_module_names(model, modules).items():
        old = model.get_submodule(name)
        if isinstance(old, COMPRESSED_TYPES):
            if old.spec() != module_from_spec(spec, device="meta").spec():
                raise ValueError(f"module {name!r} is {old.spec()} but the config asks for {spec}")
            continue
        if isinstance(old, nn.Linear):
            shape = (old.out_features, old.in_features)
        elif is_conv1d(old):  # GPT-2 Conv1D: weight (in, out), replaced by a Linear-layout layer
            shape = (old.nf, old.weight.shape[0])
        else:
            raise TypeError(
                f"module {name!r} is a {type(old).__name__}; only nn.Linear and Conv1D can be replaced"
            )
        if shape != (int(spec["out_features"]), int(spec["in_features"])):
            raise ValueError(
                f"module {name!r} has (out, in) = {shape} but quantization_config.modules says "
                f"({spec['out_features']}, {spec['in_features']})"
            )
        new = module_from_spec(
            spec, dtype=old.weight.dtype, device=old.weight.device, coefficient_dtype=coefficient_dtype
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> PIFALinear / LowRankLinear of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, COMPRESSED_TYPES)}


def dense_skeleton(model: nn.Module) -> nn.Module | None:
    """The dense architecture of ``model`` built from its config on the meta device (None if impossible)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    saved = config.__dict__.pop("quantization_config", None)
    try:
        with torch.device("meta"):
            return type(model)(config)
    except Exception as exc:  # an exotic model that cannot be rebuilt from its config
        logger.debug("dense skeleton of %s unavailable: %s", type(model).__name__, exc)
        return None
    finally:
        if saved is not None:
            config.quantization_config = saved


def _densify(layer: nn.Module, original: nn.Module | None, dtype: torch.dtype | None = None) -> nn.Module:
    """nn.Linear equivalent of a compressed layer, or a GPT-2 Conv1D when the architecture has one there."""
    dense = layer.to_dense()
    if original is not None and is_conv1d(original):
        conv = type(original)(layer.out_features, layer.in_features).to(
            dense.weight.device, dense.weight.dtype
        )
        with torch.no_grad():
            conv.weight.copy_(dense.weight.T)
            if dense.bias is not None:
                conv.bias.copy_(dense.bias)
            else:
                conv.bias.zero_()
        dense = conv
    return dense if dtype is None else dense.to(dtype)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """In place: every PIFALinear / LowRankLinear becomes the equivalent dense module of the architecture
    (nn.Linear, or Conv1D for GPT-2); the quantization config and quantizer are dropped, so the model
    saves and reloads as a plain dense model."""
    densify_modules(model, dtype)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if "is_quantized" in model.__dict__:
        model.is_quantized = False
    if config is not None and getattr(config, "_is_quantized", False):
        config._is_quantized = False
    return model


def densify_modules(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Replace every PIFALinear / LowRankLinear by the dense module it stands for, in place."""
    skeleton = dense_skeleton(model)
    for name, module in compressed_modules(model).items():
        original = skeleton.get_submodule(name) if skeleton is not None else None
        parent_name, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent_name) if parent_name else model,
            child,
            _densify(module, original, dtype),
        )
