"""``SSTModel``: the PEFT tuner that swaps targeted linear layers for :class:`SSTLinear`.

What differs from an additive adapter such as LoRA:

- the base weight is replaced, not added to: ``merge_and_unload()`` and ``merge_adapter()`` work,
  ``unload()``, ``disable_adapter()`` and ``delete_adapter()`` raise (the original dense weight is freed);
- one SST adapter per model;
- the adapter state dict also carries the biases of targeted layers and the non-SST trainable
  parameters (all of them in ``pretrain`` mode, ``train_modules`` in ``finetune`` mode), trained in
  place; ``modules_to_save`` (e.g. a classification head, added by ``task_type="SEQ_CLS"``) keeps PEFT's
  meaning (a trained copy saved with the adapter);
- parameter counts are relative to the dense model (:func:`sst_parameter_counts`).
"""

from __future__ import annotations

import re
import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from leanformers._compat import is_conv1d
from leanformers.sst.layer import SSTLayer, TrainingWatch, find_sst_layers
from leanformers.sst.linear import DENSE_WEIGHT_KEY, SSTLinear
from leanformers.sst.saving import compact_state_dict, expand_compact_state_dict, is_compact, writes_compact
from leanformers.sst.spectral import thin_svds

__all__ = [
    "PRETRAINED_IN_PRETRAIN_MODE",
    "SSTModel",
    "exclude_sst_buffers_from_ddp",
    "frozen_factors_as_parameters",
    "non_sst_trainable_names",
    "sst_buffer_names",
    "sst_parameter_counts",
]

_SST_ATTRS = SSTLayer.adapter_layer_names + SSTLayer.other_param_names

PRETRAINED_IN_PRETRAIN_MODE = (
    "SSTConfig(mode='pretrain') on a model loaded from pretrained weights ({name}): pretraining mode trains "
    "every non-SST parameter in place (embeddings, norms, head: {share:.0%} of this model) and saves all of "
    "them with the adapter. To fine-tune, use SSTConfig(mode='finetune') (PEFT's freezing; add modules with "
    "train_modules). Models built from a config (no _name_or_path) are taken as pretraining runs."
)


def loaded_from_pretrained(model: nn.Module) -> str:
    """The checkpoint ``model`` was loaded from (``config._name_or_path``), or "" for a model built from a config."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or "")


def non_sst_trainable_names(model: nn.Module, config) -> list[str]:
    """Parameter names (as in ``model.named_parameters()``) that SST trains in place besides its factors.

    ``pretrain``: every parameter outside the SST factors except the freed base weights (embeddings,
    norms, head, biases). ``finetune``: biases of targeted layers are NOT trained; parameters of
    modules listed in ``config.train_modules`` are.
    """
    layers = find_sst_layers(model)
    names = []
    for name, _ in model.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if any(f".{attr}." in f".{name}" for attr in _SST_ATTRS):
            continue
        if ".original_module." in f".{name}" or ".modules_to_save." in f".{name}":
            continue  # modules_to_save: PEFT trains (and saves) the copy, the original stays frozen
        if name.endswith("base_layer.weight") and owner.removesuffix(".base_layer") in layers:
            continue  # the freed dense weight (or a merged copy)
        if config.mode == "pretrain":
            names.append(name)
        elif config.train_modules:
            for pattern in config.train_modules:
                if re.search(rf"(^|\.){re.escape(pattern)}(\.|$)", owner) or re.fullmatch(pattern, owner):
                    names.append(name)
                    break
    return names


_SST_BUFFERS = SSTLayer.other_param_names


def sst_buffer_names(model: nn.Module) -> list[str]:
    """Names (relative to ``model``) of the SST buffers: U, Vh, indices, counters."""
    return [n for n, _ in model.named_buffers() if any(f".{b}." in f".{n}" for b in _SST_BUFFERS)]


def exclude_sst_buffers_from_ddp(model: nn.Module, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """Keep DistributedDataParallel from broadcasting SST's buffers before every forward.

    DDP's default ``broadcast_buffers=True`` re-sends every buffer from rank 0 at each forward; SST's U / Vh
    are buffers about 1.4x the size of the model. They are identical on every rank by construction (seeded
    sampling, re-SVD broadcast from rank 0; the controller broadcasts them once at start), so they are put on
    DDP's ignore list (``module._ddp_params_and_buffers_to_ignore``, read when DDP wraps ``model``), whatever
    ``ddp_broadcast_buffers`` says. Other buffers keep DDP's behaviour. Returns the names added.
    """
    names = [p + n for n in sst_buffer_names(model) for p in prefixes]
    existing = list(model.__dict__.get("_ddp_params_and_buffers_to_ignore", []) or [])
    model._ddp_params_and_buffers_to_ignore = sorted(set(existing) | set(names))
    return names


def frozen_factors_as_parameters(model: nn.Module) -> int:
    """Before ``fully_shard`` (FSDP2): hold every SST layer's frozen U and Vh as ``requires_grad=False``
    parameters, so that FSDP2 shards them (it leaves buffers whole on every rank). Returns the layer count.

    See :meth:`SSTLayer.frozen_factors_as_parameters_`; ``SSTCallback`` calls this when the Trainer is set up
    for FSDP2. State dict keys, checkpoints and saved adapters are unchanged.
    """
    layers = find_sst_layers(model, required=True)
    for layer in layers.values():
        layer.frozen_factors_as_parameters_()
    return len(layers)


def _numel(param: torch.Tensor) -> int:
    n = param.numel()
    return getattr(param, "ds_numel", n) if n == 0 else n  # DeepSpeed ZeRO-3 keeps empty placeholders


def sst_parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, all)`` parameter counts of an SST model, relative to the dense model it came from.

    - ``all``: the parameter count of the dense model: every SST layer counts as its dense weight
      ``out * in`` (+ bias), whether that weight is freed or merged; the SST factors themselves and PEFT's
      ``modules_to_save`` copies are not counted (the original module is, once).
    - ``trainable``: every parameter that receives gradients, i.e. per SST layer ``S`` (k) and the r active
      pairs ``U_active`` (m, r) / ``Vh_active`` (r, n), plus the other trained parameters (embeddings,
      norms, head and biases in ``pretrain`` mode, ``train_modules``, ``modules_to_save`` copies). The frozen
      ``U`` / ``Vh`` are buffers and never count as trainable.

    ``print_trainable_parameters()`` prints these numbers for an SST PeftModel.
    """
    layers = find_sst_layers(model)
    freed = {id(layer.get_base_layer().weight) for layer in layers.values()}
    dense = sum(layer.out_features * layer.in_features for layer in layers.values())
    trainable = 0
    for name, param in model.named_parameters():
        n = _numel(param)
        if param.requires_grad:
            trainable += n
        dotted = f".{name}"
        if id(param) in freed or any(f".{attr}." in dotted for attr in _SST_ATTRS):
            continue
        if ".modules_to_save." in dotted:
            continue
        dense += n
    return trainable, dense


class SSTModel(BaseTuner):
    """PEFT tuner of Sparse Spectral Training (registered as ``PeftType.SST``, prefix ``sst_``)."""

    prefix: str = "sst_"
    tuner_layer_cls = SSTLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _check_new_adapter_config(self, config) -> None:
        if len(self.peft_config) > 1:
            raise ValueError(
                "SST supports one adapter per model: it replaces the weights instead of adding to them. "
                "Train one SST adapter; merge_and_unload() it before adding another method."
            )

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            peft_config.target_modules = "all-linear"
        return peft_config

    def _create_and_replace(
        self, sst_config, adapter_name, target, target_name, parent, current_key, **kwargs
    ):
        if current_key is None:
            raise ValueError("current_key must not be None")
        if isinstance(target, SSTLayer):
            raise ValueError(f"{current_key!r} is already an SST layer; SST supports one adapter per model")
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            raise TypeError(
                f"SST target {current_key!r} is a {type(base).__name__}; only torch.nn.Linear and transformers "
                "Conv1D are supported. Remove it from target_modules or add it to exclude_modules."
            )
        r = sst_config.rank_for(current_key)
        new_module = SSTLinear(
            target, adapter_name, r=r, config=sst_config, layer_key=current_key, defer_svd=True
        )
        if getattr(self, "sst_watch", None) is None:
            self.sst_watch = TrainingWatch()
        new_module.sst_watch = self.sst_watch  # one "no controller" warning per model, not per layer
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        name = loaded_from_pretrained(model)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        # The SVDs of all targeted weights, several at a time (each on one thread: reproducible bits).
        pending = [layer for layer in find_sst_layers(model).values() if adapter_name in layer.pending_svd]
        for layer, factors in zip(
            pending, thin_svds([la.dense_base_weight() for la in pending]), strict=True
        ):
            layer.set_factors_(adapter_name, *factors)
        if config.mode == "pretrain" and config.init_weights and not config.inference_mode and name:
            trainable, total = sst_parameter_counts(model)
            warnings.warn(
                PRETRAINED_IN_PRETRAIN_MODE.format(name=name, share=trainable / max(total, 1)),
                UserWarning,
                stacklevel=4,
            )
        # DDP wraps the PeftModel (names "base_model.model...."), which forwards this attribute to the tuner;
        # both spellings are listed so that wrapping either of them works.
        exclude_sst_buffers_from_ddp(self, prefixes=("", "base_model."))

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        config = self.peft_config[self.active_adapters[0]]
        if config.inference_mode:
            return
        trainable = set(non_sst_trainable_names(model, config))
        for name, param in model.named_parameters():
            if name in trainable:
                param.requires_grad_(True)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # PEFT's version also upcasts BufferDicts, which would undo SSTConfig.frozen_factor_dtype: only the
        # trainable factors (S, active vectors) are kept float32 here; U / Vh keep their storage dtype.
        if not autocast_adapter_dtype:
            return
        for layer in find_sst_layers(self.model).values():
            for container in (layer.sst_S, layer.sst_U_active, layer.sst_Vh_active):
                if adapter_name in container and container[adapter_name].dtype in (
                    torch.float16,
                    torch.bfloat16,
                ):
                    p = container[adapter_name]
                    container[adapter_name] = nn.Parameter(p.data.float(), requires_grad=p.requires_grad)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        out = super()._get_adapter_state_dict(
            model=model,
            config=config,
            adapter_name=adapter_name,
            state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        # Complete state: targeted-layer biases (the base weight is gone, the bias still matters) and the
        # non-SST parameters trained in place.
        extra = set(non_sst_trainable_names(model, config))
        for name in find_sst_layers(model):
            extra.add(f"{name}.base_layer.bias")
        for key in extra:
            clean = key.removeprefix("_fsdp_wrapped_module.")
            if clean in state_dict and state_dict[clean] is not None:
                out[clean] = state_dict[clean]
        config.saved_format = "compact" if writes_compact(model, config) else "full"
        if config.saved_format == "compact":
            out = compact_state_dict(model, adapter_name, out)
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        if is_compact(state_dict):
            state_dict = expand_compact_state_dict(
                model, adapter_name, state_dict, trainable=not config.inference_mode
            )
        out = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        # the saved effective weights of dense entries reach their layer's load (which pins them)
        suffix = f".{DENSE_WEIGHT_KEY}"
        return {(f"{k}.{adapter_name}" if k.endswith(suffix) else k): v for k, v in out.items()}

    # --- what an additive adapter can do and SST cannot -----------------------------------------
    def unload(self) -> torch.nn.Module:
        raise RuntimeError(
            "SST replaced the base weights by their SVD factors and freed the dense weights, so the original "
            "model cannot be restored; use merge_and_unload() to get a plain model with the trained weights"
        )

    def disable_adapter_layers(self) -> None:
        raise RuntimeError(
            "SST adapters cannot be disabled: the original dense weights were replaced and freed. "
            "Keep a copy of the base model if you need it."
        )

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        raise RuntimeError(
            f"the SST adapter {adapter_name!r} holds the weights of every targeted layer (SST replaced the dense "
            "weights by their SVD factors and freed them), so deleting it would leave those layers without "
            "weights; use merge_and_unload() to get a plain model with the trained weights, or rebuild the base "
            "model if you want it without SST"
        )

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) relative to the DENSE model; see :func:`sst_parameter_counts`."""
        return sst_parameter_counts(self.model)
