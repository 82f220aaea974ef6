"""What ``mpifa_compress`` returns: one ``ModuleReport`` per compressed linear, gathered in a
``CompressionReport`` (densities, parameter counts, time)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["CompressionReport", "ModuleReport", "module_path"]


def module_path(prefix: str, index: int, name: str) -> str:
    """Full name of module ``name`` of block ``index`` under the blocks' path ``prefix``."""
    return f"{prefix}.{index}.{name}" if prefix else f"{index}.{name}"


@dataclass
class ModuleReport:
    name: str
    out_features: int
    in_features: int
    rank: int
    kind: str
    dense_params: int
    stored_params: int
    target_density: float
    seconds: float
    note: str | None = None  # anything the user should know about this module (e.g. a lower rank)

    @property
    def density(self) -> float:
        return self.stored_params / self.dense_params


@dataclass
class CompressionReport:
    """What was compressed (by which ``method``), how much was kept, how long it took."""

    method: str = ""
    modules: list[ModuleReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    seconds: float = 0.0
    calibration: str = ""
    calibration_tokens: int = 0
    calibration_sha256: str | None = None  # content hash of the calibration windows (None: no data read)
    # what the model was made from and with: source revision, calibration, versions (``provenance``)
    provenance: dict = field(default_factory=dict)
    # peak resident host memory during the call (set by the streaming mode, mpifa_compress_pretrained)
    peak_host_rss_bytes: int | None = None

    @property
    def targeted_params_before(self) -> int:
        return sum(m.dense_params for m in self.modules)

    @property
    def targeted_params_after(self) -> int:
        return sum(m.stored_params for m in self.modules)

    @property
    def achieved_density(self) -> float:
        """Stored / dense parameters of the targeted linears."""
        return self.targeted_params_after / max(1, self.targeted_params_before)

    @property
    def model_density(self) -> float:
        """Whole-model parameters after / before (embeddings, norms, head untouched)."""
        return self.model_params_after / max(1, self.model_params_before)

    def table(self) -> str:
        rows = [
            ("method", self.method or "-"),
            ("targeted linears", f"{len(self.modules)}"),
            ("targeted params", f"{self.targeted_params_before:,} -> {self.targeted_params_after:,}"),
            ("achieved density (targeted)", f"{self.achieved_density:.4f}"),
            ("model params", f"{self.model_params_before:,} -> {self.model_params_after:,}"),
            ("model density (whole model)", f"{self.model_density:.4f}"),
            ("calibration", f"{self.calibration} ({self.calibration_tokens:,} tokens)"),
            ("calibration sha256", self.calibration_sha256 or "-"),
            ("compression time", f"{self.seconds:.1f} s"),
        ]
        notes = [m for m in self.modules if m.note]
        if notes:
            rows.append(
                ("notes", f"{len(notes)} modules: " + "; ".join(f"{m.name} {m.note}" for m in notes[:3]))
            )
        if self.peak_host_rss_bytes is not None:
            rows.append(("peak host memory (RSS)", f"{self.peak_host_rss_bytes / 2**30:.2f} GiB"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "modules": [asdict(m) for m in self.modules],
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "targeted_params_before": self.targeted_params_before,
            "targeted_params_after": self.targeted_params_after,
            "achieved_density": self.achieved_density,
            "model_density": self.model_density,
            "seconds": self.seconds,
            "calibration": self.calibration,
            "calibration_tokens": self.calibration_tokens,
            "calibration_sha256": self.calibration_sha256,
            "provenance": self.provenance,
            "peak_host_rss_bytes": self.peak_host_rss_bytes,
        }
