"""MPIFA: Pivoting Factorization (PIFA) layers and the M reconstruction for post-training compression.

``mpifa_compress(model, tokenizer, MPIFAConfig(density=0.5), calibration=...)`` compresses in place;
``save_compressed`` writes safetensors + ``quantization_config`` that ``from_pretrained`` reloads
after ``import leanformers`` (the ``mpifa`` quantizer is registered when this package is imported).
"""

from leanformers.pifa.compress import CompressionReport, MPIFAConfig, mpifa_compress
from leanformers.pifa.layer import LowRankLinear, PIFALinear
from leanformers.pifa.quantizer import MPIFAQuantizationConfig, dequantize_model, save_compressed

__all__ = [
    "CompressionReport",
    "LowRankLinear",
    "MPIFAConfig",
    "MPIFAQuantizationConfig",
    "PIFALinear",
    "dequantize_model",
    "mpifa_compress",
    "save_compressed",
]
