"""MPIFA: Pivoting Factorization (PIFA) layers and the M reconstruction for post-training compression.

``mpifa_compress(model, tokenizer, MPIFAConfig(density=0.5), calibration=...)`` compresses in place;
``save_compressed`` writes safetensors + ``quantization_config`` that ``from_pretrained`` reloads
after ``import leanformers`` (the ``mpifa`` quantizer is registered when this package is imported).
Module map: docs/mpifa.md (compression stages) and docs/pifa_format.md (format and reload).
"""

from leanformers.pifa import quantizer  # noqa: F401  (registers the `mpifa` transformers quantizer)
from leanformers.pifa.compress import CompressionReport, MPIFAConfig, mpifa_compress
from leanformers.pifa.integration import dequantize_model
from leanformers.pifa.layer import CompressedLinear, LowRankLinear, PIFALinear, set_coefficient_dtype_
from leanformers.pifa.quantization_config import MPIFAQuantizationConfig
from leanformers.pifa.saving import save_compressed

__all__ = [
    "CompressedLinear",
    "CompressionReport",
    "LowRankLinear",
    "MPIFAConfig",
    "MPIFAQuantizationConfig",
    "PIFALinear",
    "dequantize_model",
    "mpifa_compress",
    "save_compressed",
    "set_coefficient_dtype_",
]
