"""Sparse Spectral Training (SST) as a PEFT tuner; importing this package registers ``sst`` with PEFT."""

from leanformers.sst.register import register_sst

register_sst()

from leanformers.sst.callback import SSTCallback  # noqa: E402
from leanformers.sst.config import SSTConfig  # noqa: E402
from leanformers.sst.controller import SSTController  # noqa: E402
from leanformers.sst.layer import SSTLayer, find_sst_layers  # noqa: E402
from leanformers.sst.linear import SSTLinear  # noqa: E402
from leanformers.sst.model import SSTModel, frozen_factors_as_parameters  # noqa: E402

__all__ = [
    "SSTCallback",
    "SSTConfig",
    "SSTController",
    "SSTLayer",
    "SSTLinear",
    "SSTModel",
    "find_sst_layers",
    "frozen_factors_as_parameters",
    "register_sst",
]
