"""``CompressionConfig``: the settings every compressor shares (calibration windows, compute device,
activation offload, which linears, layout overrides). Each compressor's config extends it with its own
fields (``MPIFAConfig``, ``WandaConfig``, ...); the config's type selects the compressor."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

__all__ = ["OFFLOAD_MODES", "CompressionConfig", "check_fraction", "check_finite"]

OFFLOAD_MODES = ("none", "cpu", "disk")


def check_finite(name: str, value) -> float:
    """``value`` as a float, or a ValueError naming ``name`` when it is not a finite real number (NaN,
    inf, a string, a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_fraction(name: str, value, *, open_low: bool = True) -> float:
    """``value`` in (0, 1] (``open_low``) or [0, 1]; else a ValueError naming ``name`` and the range."""
    value = check_finite(name, value)
    ok = (0.0 < value <= 1.0) if open_low else (0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"{name} must lie in {'(0, 1]' if open_low else '[0, 1]'}, got {value}")
    return value


@dataclass(kw_only=True)
class CompressionConfig:
    """Settings shared by every compressor (keyword-only; a method's own fields come first).

    Attributes:
        targets: fnmatch patterns of module paths inside a block (None: every linear of the layout).
        nsamples, seqlen: calibration windows drawn from text calibration sources.
        batch_size: calibration windows per forward pass.
        device: "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
        offload: where the calibration activations (the streams and the captured group inputs) wait
            between passes: "none" (on the compute device), "cpu" (host memory; the GPU holds one batch
            at a time) or "disk" (memory-mapped files in ``offload_folder``; host memory holds one batch).
            Results are bit-identical whichever is chosen. See docs/scaling.md (streaming).
        offload_folder: folder of the "disk" offload files (default: the system temp folder).
        offload_streams: deprecated alias of offload="cpu".
        seed: seed of the calibration window sampling.
        calibration_sha256: the expected content hash of the calibration windows (reported by every run);
            a run whose windows differ stops before compressing (a pinned, reproducible calibration).
        blocks_path, groups, attention: layout overrides (default: the built-in table for LLaMA, Qwen2,
            OPT, GPT-2, BERT, inferred for any other model by ``compression.layout.infer_layout``).
    """

    method: ClassVar[str] = ""  # the registered name of the compressor this config selects

    targets: list[str] | None = None
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 8
    device: str = "auto"
    offload: str = "none"
    offload_folder: str | None = None
    offload_streams: bool = False
    seed: int = 0
    calibration_sha256: str | None = None
    blocks_path: str | None = None
    groups: list[list[str]] | None = None
    attention: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("nsamples", "batch_size"):
            self._check_int(name, low=1)
        self._check_int("seqlen", low=2)
        self._check_int("seed", low=0)
        sha = self.calibration_sha256
        if sha is not None and not (
            isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdefABCDEF" for c in sha)
        ):
            raise ValueError(f"calibration_sha256 must be a sha256 hex digest (64 characters), got {sha!r}")
        self._check_offload()

    def _check_int(self, name: str, low: int, optional: bool = False) -> None:
        value = getattr(self, name)
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    def _check_offload(self) -> None:
        if self.offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {self.offload!r}")
        if self.offload_streams:
            warnings.warn(
                f"{type(self).__name__}.offload_streams is deprecated: use offload='cpu' (--offload cpu)",
                FutureWarning,
                stacklevel=4,
            )
            if self.offload == "none":
                self.offload = "cpu"
            self.offload_streams = False
        if self.offload_folder is not None and self.offload != "disk":
            raise ValueError(
                f"offload_folder is only used with offload='disk' (--offload disk), not offload={self.offload!r}"
            )

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict:
        return asdict(self)
