"""The method-agnostic compression core: one block pipeline (in memory or streamed from checkpoint
shards), the activation streams, and the ``Compressor`` protocol every method implements.

``compress(model, tokenizer, config, calibration=...)`` compresses in place with the method the config's
type selects; ``compress_pretrained(folder, output, config, ...)`` streams a checkpoint block by block.
A new method is a ``Compressor`` subclass registered with ``register_compressor`` (ARCHITECTURE.md).
"""

from leanformers.compression.compressor import (
    COMPRESSORS,
    Compressor,
    available_compressors,
    compressor_for,
    get_compressor,
    register_compressor,
)
from leanformers.compression.config import CompressionConfig
from leanformers.compression.pipeline import compress
from leanformers.compression.pretrained import compress_pretrained
from leanformers.compression.report import CompressionReport, ModuleReport
from leanformers.compression.streams import StreamNeeds

__all__ = [
    "COMPRESSORS",
    "CompressionConfig",
    "CompressionReport",
    "Compressor",
    "ModuleReport",
    "StreamNeeds",
    "available_compressors",
    "compress",
    "compress_pretrained",
    "compressor_for",
    "get_compressor",
    "register_compressor",
]
