"""leanformers: Sparse Spectral Training, Cannistraci-Hebb soft-rule sparse training and MPIFA
low-rank compression for the Hugging Face stack.

Importing the package registers the ``sst`` PEFT tuner and the ``mpifa`` transformers quantizer.
"""

from leanformers._version import __version__
from leanformers.chts import CHTssCallback, CHTssConfig, CHTssController, CHTssScheduler
from leanformers.data import calibration_windows, evaluation_windows, load_text, tokenize_text
from leanformers.eval import PerplexityResult, perplexity
from leanformers.pifa import (  # registers the `mpifa` transformers quantizer
    CompressionReport,
    LowRankLinear,
    MPIFAConfig,
    MPIFAQuantizationConfig,
    PIFALinear,
    dequantize_model,
    mpifa_compress,
    save_compressed,
)
from leanformers.sst import SSTCallback, SSTConfig, SSTController  # registers the `sst` PEFT tuner

__all__ = [
    "CHTssCallback",
    "CHTssConfig",
    "CHTssController",
    "CHTssScheduler",
    "CompressionReport",
    "LowRankLinear",
    "MPIFAConfig",
    "MPIFAQuantizationConfig",
    "PIFALinear",
    "PerplexityResult",
    "SSTCallback",
    "SSTConfig",
    "SSTController",
    "__version__",
    "calibration_windows",
    "dequantize_model",
    "evaluation_windows",
    "load_text",
    "mpifa_compress",
    "perplexity",
    "save_compressed",
    "tokenize_text",
]
