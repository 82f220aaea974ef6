"""How a PIFA layer stores its coefficients C in a 16-bit model (``coefficient_dtype``).

In a bf16 model, C stored in bf16 perturbs W 2-3x more than a bf16 U V of the same matrix (C multiplies
every pivot row it combines, so its rounding adds up). By default ("auto") a bf16 PIFA layer keeps C in
float16 (three more mantissa bits, the same bytes). docs/pifa_format.md has the table and
docs/benchmarks.md §13 the measurement.
"""

from __future__ import annotations

import torch

__all__ = [
    "AUTO_COEFFICIENT_DTYPE",
    "COEFFICIENT_DTYPES",
    "check_coefficient_setting",
    "checked_cast",
    "coefficient_storage_dtype",
]

# Settings of PIFALinear(coefficient_dtype=...): "auto" (the measured default below), "same" (C in the
# dtype of the other parameters), or a dtype name C is stored in whenever the layer is 16-bit.
COEFFICIENT_DTYPES = ("auto", "same", "float32", "float16", "bfloat16")
# "auto": the storage of C for a layer whose other parameters are in the key's dtype (others: "same").
# bf16 -> fp16: same bytes, 3 more mantissa bits. SmolLM2-135M MPIFA 0.8, bf16 forward: +0.263 % perplexity
# vs fp32 where all-bf16 storage gives +0.543 % (docs/benchmarks.md §13).
AUTO_COEFFICIENT_DTYPE: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.float16}


def check_coefficient_setting(setting: str) -> str:
    if setting not in COEFFICIENT_DTYPES:
        raise ValueError(f"coefficient_dtype must be one of {COEFFICIENT_DTYPES}, got {setting!r}")
    return setting


def coefficient_storage_dtype(param_dtype: torch.dtype | None, setting: str = "auto") -> torch.dtype:
    """dtype of a PIFA layer's coefficients C when its other parameters are ``param_dtype``
    (None: torch's default dtype). ``setting`` (see COEFFICIENT_DTYPES) applies only to 16-bit layers:
    a float32 / float64 layer always stores C in its own dtype."""
    check_coefficient_setting(setting)
    param_dtype = param_dtype or torch.get_default_dtype()
    if setting == "same" or not param_dtype.is_floating_point or param_dtype.itemsize > 2:
        return param_dtype
    if setting == "auto":
        return AUTO_COEFFICIENT_DTYPE.get(param_dtype, param_dtype)
    return getattr(torch, setting)


def checked_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; a finite value that overflows it (|C| > 65504 in float16) is an error, not an inf."""
    out = t.to(dtype)
    real = out.device.type != "meta" and dtype.is_floating_point and out.numel() > 0
    if real and not bool(torch.isfinite(out).all()) and bool(torch.isfinite(t).all()):
        raise OverflowError(
            f"PIFA coefficients up to |C| = {t.abs().max().item():.4g} overflow {dtype}: store them in "
            "float32 (coefficient_dtype='float32') or as the layer's dtype (coefficient_dtype='same')"
        )
    return out
