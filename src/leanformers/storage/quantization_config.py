"""``quantization_config`` of an MPIFA checkpoint: the ``QuantizationConfigMixin`` transformers reads
from config.json (the ``utils/quantization_config.py`` part of a transformers integration)."""

from __future__ import annotations

import json
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from leanformers._version import __version__
from leanformers.storage.coefficients import COEFFICIENT_DTYPES
from leanformers.storage.validation import check_spec

__all__ = ["QUANT_METHOD", "REQUIRES", "MPIFAQuantizationConfig"]

QUANT_METHOD = "mpifa"
# Written into every config so that a reader of config.json (or of transformers' "Unknown quantization
# type, got mpifa" warning) learns how to load the folder.
REQUIRES = "leanformers (pip install leanformers; `import leanformers` before from_pretrained)"


class MPIFAQuantizationConfig(QuantizationConfigMixin):
    """``quantization_config`` of an MPIFA checkpoint (serialised into config.json).

    Args:
        modules: module name -> ``layer.spec()`` for every compressed module (ranks live here because
            modules are swapped on the meta device before any weight is read).
        density: target density of the targeted linears; alpha, steps: M settings; calibration: a
            description of the calibration data; leanformers_version: the writer's version;
            extra: free-form JSON-able details (allocation, achieved density, ...).
        coefficient_dtype: storage of the PIFA coefficients in a 16-bit model (one of
            ``COEFFICIENT_DTYPES``; "auto": float16 coefficients in a bf16 model, see PIFALinear). A
            loading attribute: ``from_pretrained(folder, quantization_config=
            MPIFAQuantizationConfig(coefficient_dtype="same"))`` overrides the saved value.
    """

    def __init__(
        self,
        modules: dict[str, dict] | None = None,
        density: float | None = None,
        alpha: float | None = None,
        steps: int | None = None,
        calibration: str | None = None,
        leanformers_version: str | None = None,
        extra: dict | None = None,
        coefficient_dtype: str = "auto",
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        kwargs.pop("requires", None)
        self.quant_method = QUANT_METHOD
        self.modules = {str(k): dict(v) for k, v in (modules or {}).items()}
        self.density = density
        self.alpha = alpha
        self.steps = steps
        self.calibration = calibration
        self.leanformers_version = __version__ if leanformers_version is None else leanformers_version
        self.coefficient_dtype = coefficient_dtype
        self.extra = dict(extra or {})
        self.extra.update(kwargs)  # unknown keys of a newer writer survive a round trip
        self.post_init()

    def post_init(self) -> None:
        """Validate the arguments (transformers' ``QuantizationConfigMixin`` convention)."""
        if not isinstance(self.modules, dict):
            raise TypeError(f"modules must be a dict name -> spec, got {type(self.modules).__name__}")
        for name, spec in self.modules.items():
            check_spec(name, spec)
        if self.density is not None and not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.coefficient_dtype not in COEFFICIENT_DTYPES:
            raise ValueError(
                f"coefficient_dtype must be one of {COEFFICIENT_DTYPES}, got {self.coefficient_dtype!r}"
            )

    def get_loading_attributes(self) -> dict[str, Any]:
        """What a config passed to ``from_pretrained`` overrides in the saved one (transformers'
        ``merge_quantization_configs``; registered in ``quantizer.register``)."""
        return {"coefficient_dtype": self.coefficient_dtype}

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "requires": REQUIRES,
            "modules": {k: dict(v) for k, v in self.modules.items()},
            "density": self.density,
            "alpha": self.alpha,
            "steps": self.steps,
            "calibration": self.calibration,
            "leanformers_version": self.leanformers_version,
            "coefficient_dtype": self.coefficient_dtype,
            "extra": json.loads(json.dumps(self.extra, default=str)),
        }

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @property
    def ranks(self) -> dict[str, int]:
        return {name: int(spec["rank"]) for name, spec in self.modules.items()}
