"""Deprecated: ``leanformers.pifa.quantizer`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.pifa import warn_moved
from leanformers.storage.integration import (  # noqa: E402
    compressed_modules,
    dequantize_model,
    replace_with_pifa_layers,
    resolve_module_names,
)
from leanformers.storage.peft_bridge import enable_peft_lora  # noqa: E402
from leanformers.storage.quantization_config import QUANT_METHOD, MPIFAQuantizationConfig  # noqa: E402
from leanformers.storage.quantizer import MPIFAHfQuantizer, register  # noqa: E402
from leanformers.storage.saving import save_compressed  # noqa: E402

warn_moved(
    "leanformers.pifa.quantizer",
    "leanformers.storage.integration, leanformers.storage.peft_bridge, leanformers.storage.quantization_config, leanformers.storage.quantizer, leanformers.storage.saving",
)

__all__ = [
    "MPIFAHfQuantizer",
    "MPIFAQuantizationConfig",
    "QUANT_METHOD",
    "compressed_modules",
    "dequantize_model",
    "enable_peft_lora",
    "register",
    "replace_with_pifa_layers",
    "resolve_module_names",
    "save_compressed",
]
