"""transformers lifecycle of the compressed-layer format: the ``HfQuantizer`` and its registration (the
``quantizers/quantizer_<method>.py`` part of a transformers integration).

After ``import leanformers`` the registered ``MPIFAHfQuantizer`` (quant_method ``mpifa``: the format of
every low-rank compressor's output, PIFA or U V layers) swaps the modules a checkpoint's
``quantization_config`` lists for empty PIFALinear / LowRankLinear layers on the meta device before
the weights load, so ``AutoModelForCausalLM.from_pretrained(folder)`` returns the compressed model
exactly. The other parts live beside it: quantization_config.py (``MPIFAQuantizationConfig``),
integration.py (module swaps, ``dequantize_model``), saving.py (``save_compressed`` and the load guard),
peft_bridge.py (``enable_peft_lora``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers import auto as transformers_quantizers_auto
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from leanformers.storage.integration import densify_modules, replace_with_pifa_layers, resolve_module_names
from leanformers.storage.quantization_config import QUANT_METHOD, MPIFAQuantizationConfig
from leanformers.storage.saving import check_safetensors_only
from leanformers.storage.validation import check_checkpoint_tensors, check_gather_indices

__all__ = ["MPIFAHfQuantizer", "register"]


class MPIFAHfQuantizer(HfQuantizer):
    """Loads MPIFA checkpoints: swaps the listed modules on meta, then transformers loads the tensors."""

    requires_calibration = True  # a dense checkpoint cannot be "quantized" on load: run mpifa-compress
    requires_parameters_quantization = False

    def __init__(self, quantization_config: MPIFAQuantizationConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        files = kwargs.get("checkpoint_files") or []
        check_safetensors_only(files)
        # Before any weight is read: every tensor the specs need is in the shard headers, with its shape.
        prefix = getattr(model, "base_model_prefix", "") or ""
        self.tensor_files = check_checkpoint_tensors(self.quantization_config.modules, files, prefix)
        # The config then lists the names of this model (e.g. without "model." under AutoModel), so a
        # later save_compressed of the loaded model agrees with its modules.
        self.quantization_config.modules = resolve_module_names(model, self.quantization_config.modules)
        replace_with_pifa_layers(
            model,
            self.quantization_config.modules,
            coefficient_dtype=getattr(self.quantization_config, "coefficient_dtype", "auto"),
        )
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        # Gather indices must be permutations: a duplicated or out-of-range entry would run silently wrong.
        check_gather_indices(
            model, getattr(self, "tensor_files", {}), getattr(model, "base_model_prefix", "") or ""
        )
        return model

    def _dequantize(self, model, dtype: torch.dtype | None = None):
        # transformers then drops the quantization config (remove_quantization_config)
        densify_modules(model, dtype)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Register the ``mpifa`` config and quantizer with transformers (idempotent; done at import)."""
    for mapping, cls in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, MPIFAQuantizationConfig),
        (AUTO_QUANTIZER_MAPPING, MPIFAHfQuantizer),
    ):
        current = mapping.get(QUANT_METHOD)
        if current is not None and current.__name__ != cls.__name__:
            raise RuntimeError(f"quant_method {QUANT_METHOD!r} is already registered by {current.__module__}")
        # Direct assignment (not register_*) so a module reload replaces the classes instead of raising.
        mapping[QUANT_METHOD] = cls
    # A config passed to from_pretrained then overrides the saved one's loading attributes
    # (coefficient_dtype) instead of being ignored with a warning.
    types = getattr(transformers_quantizers_auto, "LOADING_ATTRIBUTES_CONFIG_TYPES", None)
    if isinstance(types, tuple):
        others = tuple(t for t in types if t.__name__ != MPIFAQuantizationConfig.__name__)
        transformers_quantizers_auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*others, MPIFAQuantizationConfig)


register()
