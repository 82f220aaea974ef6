"""Deprecated package: MPIFA and its storage format moved in leanformers 0.x (see ARCHITECTURE.md).

``leanformers.pifa.<module>`` keeps working as a shim that re-exports the old names from their new homes
and warns once (FutureWarning): the compression core is ``leanformers.compression``, the methods are in
``leanformers.compressors`` (MPIFA: ``compressors.mpifa``), the layers / quantizer / saving are in
``leanformers.storage``. Import public names from ``leanformers`` itself.
"""

import warnings


def warn_moved(old: str, new: str) -> None:
    """Warn once (at import of the shim ``old``) that its names now live in ``new``."""
    warnings.warn(
        f"{old} is deprecated and will be removed: import from {new} (or from `leanformers`) instead",
        FutureWarning,
        stacklevel=3,
    )


from leanformers.compression.report import CompressionReport  # noqa: E402
from leanformers.compressors.mpifa import MPIFAConfig, mpifa_compress  # noqa: E402
from leanformers.storage import (  # noqa: E402
    CompressedLinear,
    LowRankLinear,
    MPIFAQuantizationConfig,
    PIFALinear,
    dequantize_model,
    save_compressed,
    set_coefficient_dtype_,
)

warn_moved("leanformers.pifa", "leanformers.compression / leanformers.compressors / leanformers.storage")

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
