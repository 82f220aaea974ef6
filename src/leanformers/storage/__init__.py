"""The storage format of compressed models: the PIFA and low-rank layers, their transformers quantizer
(quant_method ``mpifa``: swaps the layers in on the meta device before the weights load), saving with
the load guard, and the N:M sparsity record of pruned models (which reload as plain checkpoints).
docs/pifa_format.md describes the format and what is checked on load."""

from leanformers.storage import quantizer  # noqa: F401  (registers the `mpifa` transformers quantizer)
from leanformers.storage.integration import dequantize_model
from leanformers.storage.layers import CompressedLinear, LowRankLinear, PIFALinear
from leanformers.storage.pifa_linear import set_coefficient_dtype_
from leanformers.storage.quantization_config import MPIFAQuantizationConfig
from leanformers.storage.saving import save_compressed

__all__ = [
    "CompressedLinear",
    "LowRankLinear",
    "MPIFAQuantizationConfig",
    "PIFALinear",
    "dequantize_model",
    "save_compressed",
    "set_coefficient_dtype_",
]
