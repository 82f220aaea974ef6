"""``MPIFAConfig``: how ``mpifa_compress`` compresses (validated on construction)."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

__all__ = ["MPIFAConfig"]


@dataclass
class MPIFAConfig:
    """How to compress. Defaults follow the paper (M with alpha 0.25 and 2 steps, PIFA output, 128 x 2048
    calibration tokens) except ``shrinkage`` 0.1 (docs/benchmarks.md §14).

    Attributes:
        density: kept fraction of the parameters of the targeted linears, in (0, 1].
        attn_density: density of the attention linears; the MLP density is solved to keep the budget.
        allocation: how the parameter budget is spread over the targeted linears: "uniform" (every
            linear at ``density``) or "spectrum" (data-driven: a dense pass measures each linear's
            whitened singular values, then ranks go greedily where they remove the largest share of
            that linear's output energy per stored parameter, under the global budget; each linear's
            density stays within [density / 2, min(1, 1.5 density)]).
        owl: follow the OWL outlier share layer by layer (computed on the calibration data).
        owl_lambda: largest deviation of a layer's density from ``density`` under OWL.
        owl_threshold: OWL outlier threshold M (|W_ij| ||X_j|| > M x mean).
        alpha: weight of the dense-model target in Y = (1 - alpha) W X_c + alpha W X_d, in [0, 1].
        steps: closed-form alternating steps after the init (0: init only, 1: U-step, 2: U then V).
        init: "whiten" (SVD-LLM truncation-aware whitening) or "svd" (plain truncated SVD).
        output: "pifa" (PIFA layers) or "lowrank" (U V layers; the low-rank baseline at equal density).
        form: PIFA layout ("auto", "row", "column"); see PIFALinear.
        scatter_free_mlp: with PIFA output and form "auto", store the MLP's second linear (down_proj,
            fc2, ...) in column form and let the first ones emit channels in its pivot-first order, so
            that it reads contiguous slices without any gather (function-preserving reordering).
        damping: relative damping of the V-step normal equations.
        shrinkage: shrink the calibration second moments (G, K, S) toward their diagonals by this
            share, in [0, 1]: a prior against correlations that only the calibration text has. 0.1 was
            chosen among 0, 0.1 and 0.3 on validation texts (docs/benchmarks.md §14); 0 is the paper.
        rank_multiple: round ranks DOWN to a multiple of this (kernel-friendly; never over budget).
            None: 8 when compressing on a GPU (tensor-core aligned operands), 1 on the CPU.
        targets: fnmatch patterns of module paths inside a block (None: every linear of the layout).
        nsamples, seqlen: calibration windows drawn from text calibration sources.
        batch_size: calibration windows per forward pass.
        device: "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
        offload: where the calibration activations (both streams and the captured group inputs) wait
            between passes: "none" (on the compute device), "cpu" (host memory; the GPU holds one batch
            at a time) or "disk" (memory-mapped files in ``offload_folder``; host memory holds one batch).
            Results are bit-identical whichever is chosen. See docs/scaling.md (MPIFA streaming).
        offload_folder: folder of the "disk" offload files (default: the system temp folder).
        offload_streams: deprecated alias of offload="cpu".
        seed: seed of the calibration window sampling.
        blocks_path, groups, attention: layout overrides (default: the built-in table for LLaMA, Qwen2,
            OPT, GPT-2, BERT, inferred for any other model by ``calibration.infer_layout``).
    """

    density: float = 0.5
    attn_density: float | None = None
    allocation: str = "uniform"
    owl: bool = False
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0
    alpha: float = 0.25
    steps: int = 2
    init: str = "whiten"
    output: str = "pifa"
    form: str = "auto"
    scatter_free_mlp: bool = True
    damping: float = 1e-2
    shrinkage: float = 0.1
    rank_multiple: int | None = None
    targets: list[str] | None = None
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 8
    device: str = "auto"
    offload: str = "none"
    offload_folder: str | None = None
    offload_streams: bool = False
    seed: int = 0
    blocks_path: str | None = None
    groups: list[list[str]] | None = None
    attention: list[str] | None = None

    def __post_init__(self):
        def unit(name, value, low_open=True):
            ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
            if not ok:
                rng = "(0, 1]" if low_open else "[0, 1]"
                raise ValueError(f"{name} must lie in {rng}, got {value}")

        unit("density", self.density)
        if self.attn_density is not None:
            unit("attn_density", self.attn_density)
            if self.owl:
                raise ValueError("choose either owl or attn_density, not both")
        unit("alpha", self.alpha, low_open=False)
        unit("shrinkage", self.shrinkage, low_open=False)
        if self.allocation not in ("uniform", "spectrum"):
            raise ValueError(f"allocation must be 'uniform' or 'spectrum', got {self.allocation!r}")
        if self.allocation == "spectrum" and (self.owl or self.attn_density is not None):
            raise ValueError(
                "allocation='spectrum' sets every linear's density itself; drop owl / attn_density, or use "
                "allocation='uniform' with them"
            )
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.init not in ("whiten", "svd"):
            raise ValueError(f"init must be 'whiten' or 'svd', got {self.init!r}")
        if self.output not in ("pifa", "lowrank"):
            raise ValueError(f"output must be 'pifa' or 'lowrank', got {self.output!r}")
        if self.form not in ("auto", "row", "col", "column"):
            raise ValueError(f"form must be 'auto', 'row' or 'column', got {self.form!r}")
        if (
            (self.rank_multiple is not None and self.rank_multiple < 1)
            or self.nsamples < 1
            or self.seqlen < 2
            or self.batch_size < 1
        ):
            raise ValueError("rank_multiple, nsamples, batch_size must be >= 1 and seqlen >= 2")

        self._check_offload()

    def _check_offload(self) -> None:
        if self.offload not in ("none", "cpu", "disk"):
            raise ValueError(f"offload must be 'none', 'cpu' or 'disk', got {self.offload!r}")
        if self.offload_streams:
            warnings.warn(
                "MPIFAConfig.offload_streams is deprecated: use offload='cpu' (--offload cpu)",
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

    @property
    def needs_statistics(self) -> bool:
        """Whether compression reads calibration data (all but plain SVD with uniform ranks and no M)."""
        return self.init == "whiten" or self.steps > 0 or self.owl or self.allocation == "spectrum"

    def to_dict(self) -> dict:
        return asdict(self)
