"""leanformers: Sparse Spectral Training, Cannistraci-Hebb soft-rule sparse training and MPIFA
compression (with its baselines) for the Hugging Face stack.

Importing the package registers the ``sst`` PEFT tuner, the ``mpifa`` transformers quantizer (the
storage format of every low-rank compressor) and the built-in compressors. The public names are listed
and explained in docs/api.md.
"""

from leanformers._version import __version__
from leanformers.chts import CHTssCallback, CHTssConfig, CHTssController
from leanformers.compression import (
    CompressionConfig,
    CompressionReport,
    Compressor,
    available_compressors,
    compress,
    compress_pretrained,
    register_compressor,
)
from leanformers.compressors import *  # noqa: F403  (every built-in method's config and MPIFA's entries)
from leanformers.compressors import __all__ as _compressors_all
from leanformers.data import calibration_windows, evaluation_windows, load_text, tokenize_text
from leanformers.eval import PerplexityResult, perplexity
from leanformers.sst import SSTCallback, SSTConfig, SSTController  # registers the `sst` PEFT tuner
from leanformers.storage import (  # registers the `mpifa` transformers quantizer
    LowRankLinear,
    MPIFAQuantizationConfig,
    PIFALinear,
    dequantize_model,
    save_compressed,
    set_coefficient_dtype_,
)

__all__ = [
    "CHTssCallback",
    "CHTssConfig",
    "CHTssController",
    "CompressionConfig",
    "CompressionReport",
    "Compressor",
    "LowRankLinear",
    "MPIFAQuantizationConfig",
    "PIFALinear",
    "PerplexityResult",
    "SSTCallback",
    "SSTConfig",
    "SSTController",
    "__version__",
    "available_compressors",
    "calibration_windows",
    "compress",
    "compress_pretrained",
    "dequantize_model",
    "evaluation_windows",
    "load_text",
    "perplexity",
    "register_compressor",
    "save_compressed",
    "set_coefficient_dtype_",
    "tokenize_text",
    *_compressors_all,
]
