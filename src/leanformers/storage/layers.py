"""The compressed linear layers of the storage format, by ``kind`` (the key of a module spec).

``LAYER_KINDS`` is the registry ``module_from_spec`` (and so the quantizer) builds from: a new layer kind
is a ``CompressedLinear`` subclass registered here.
"""

from __future__ import annotations

import torch
from torch import nn

from leanformers.storage.base import CompressedLinear
from leanformers.storage.lowrank_linear import LowRankLinear
from leanformers.storage.pifa_linear import PIFALinear

__all__ = ["LAYER_KINDS", "CompressedLinear", "LowRankLinear", "PIFALinear", "module_from_spec"]

LAYER_KINDS: dict[str, type[CompressedLinear]] = {"pifa": PIFALinear, "lowrank": LowRankLinear}


def module_from_spec(
    spec: dict, dtype: torch.dtype | None = None, device=None, coefficient_dtype: str = "auto"
) -> nn.Module:
    """Empty PIFALinear / LowRankLinear (parameters uninitialised on meta) from ``layer.spec()``;
    ``coefficient_dtype``: the C storage of a PIFA layer (see PIFALinear)."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"module spec must be a dict with a 'kind' key, got {spec!r}")
    if spec["kind"] not in LAYER_KINDS:
        raise ValueError(f"unknown module kind {spec['kind']!r}: expected one of {sorted(LAYER_KINDS)}")
    options = {"coefficient_dtype": coefficient_dtype} if spec["kind"] == "pifa" else {}
    return LAYER_KINDS[spec["kind"]].from_spec(spec, dtype=dtype, device=device, **options)
