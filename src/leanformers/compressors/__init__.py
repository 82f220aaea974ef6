"""The built-in compressors, one module each, registered on import (``compression.register_compressor``).

| method | config | module |
|---|---|---|
| mpifa | MPIFAConfig | mpifa.py (M reconstruction + PIFA layers) |
| svd-llm | SVDLLMConfig | svd.py (truncation-aware whitening) |
| asvd | ASVDConfig | asvd.py (activation-aware channel scaling) |
| svd | SVDConfig | svd.py (plain truncated SVD) |
| wanda-2:4 | WandaConfig | wanda.py (N:M pruning by |W| ||X||) |
| sparsegpt-2:4 | SparseGPTConfig | sparsegpt.py (N:M pruning with OBS error compensation) |

Shared parts: lowrank.py (the low-rank family: rank budget, PIFA / U V layers), budget.py and
allocation.py (how ranks are spread), reconstruct.py (the maths of M and the whitening),
semistructured.py (the N:M family).
"""

from leanformers.compressors.asvd import ASVDConfig
from leanformers.compressors.mpifa import MPIFAConfig, mpifa_compress, mpifa_compress_pretrained
from leanformers.compressors.sparsegpt import SparseGPTConfig
from leanformers.compressors.svd import SVDConfig, SVDLLMConfig
from leanformers.compressors.wanda import WandaConfig

__all__ = [
    "ASVDConfig",
    "MPIFAConfig",
    "SVDConfig",
    "SparseGPTConfig",
    "SVDLLMConfig",
    "WandaConfig",
    "mpifa_compress",
    "mpifa_compress_pretrained",
]
