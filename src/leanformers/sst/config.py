"""``SSTConfig``: the PEFT configuration of Sparse Spectral Training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from leanformers.sst.spectral import SAMPLING_MODES

__all__ = ["SSTConfig"]

MODES = ("pretrain", "finetune")


@dataclass
class SSTConfig(PeftConfig):
    """Sparse Spectral Training (Zhao et al., ICML 2025) as a PEFT tuner.

    Every targeted linear layer W (out, in) becomes its full-rank thin SVD U diag(S) Vh. All of S
    trains every step; r singular-vector pairs (columns of U, rows of Vh) train at a time and are
    re-sampled every ``steps_per_iteration`` optimizer steps; a re-SVD closes each round. Drive the
    schedule with ``SSTCallback`` (HF Trainer) or ``SSTController`` (custom loops).

    Args:
        r: active singular-vector pairs per layer (>= 1, <= min(out, in) of every targeted layer).
        target_modules: module names / regex, or ``"all-linear"`` (all linear and Conv1D layers except
            the output head), the default.
        exclude_modules: module names / regex never targeted.
        rank_pattern: ``{name regex: r}`` overrides of ``r`` per layer.
        steps_per_iteration: optimizer steps between two re-samplings of the active vectors.
        warmup_steps_per_iteration: linear learning-rate re-warm-up steps at the start of each iteration
            (after the first), on top of the user's schedule. 0 disables it.
        iterations_per_round: iterations between two re-SVDs; ``None`` means ceil(k / r) per layer.
        sampling: ``"multinomial"`` (the paper; see ``magnitude_mix``), or the ablations ``"uniform"``,
            ``"top_r"``, ``"sequential"``.
        magnitude_mix: beta in p_i = (1 - beta)/k + beta S_i / sum(S) (``multinomial`` only).
        enhanced_gradient: divide the gradient of active vector i by S_i (the paper's default).
        mode: ``"pretrain"``: every non-SST parameter (embeddings, norms, head, biases) trains in place and
            is saved with the adapter; ``"finetune"``: PEFT's usual freezing, plus ``train_modules``.
        train_modules: in ``finetune`` mode, module names (or name suffixes) whose parameters stay
            trainable in place and are saved with the adapter (no ``modules_to_save`` copies).
        modules_to_save: PEFT's usual meaning: these modules (e.g. a classification head) get a trainable
            copy that is saved with the adapter; ``task_type="SEQ_CLS"`` adds ``classifier`` / ``score`` (as
            for LoRA). Prefer ``train_modules`` for large modules such as embeddings (no copy).
        seed: seed of the index sampling (combined with layer name and iteration, so every rank and a
            resumed run draw the same indices).
        frozen_factor_dtype: storage dtype of the frozen U and Vh buffers (``"float32"``, ``"bfloat16"``,
            ``"float16"``). U and Vh hold k(m + n) numbers per layer (about 1.4x the dense weight for LLM
            shapes); ``"bfloat16"`` halves them. S, the active vectors and every re-SVD stay float32.
        init_weights: ``True`` takes the SVD of the base weights at injection. ``False`` allocates the
            factors without computing them; they must be loaded from a saved adapter (a saved
            adapter_config.json carries ``False``, so reloading never recomputes an SVD).
    """

    r: int = field(default=64, metadata={"help": "Active singular-vector pairs per layer."})
    target_modules: list[str] | str | None = field(
        default="all-linear",
        metadata={"help": "Module names / regex to replace with SST layers, or 'all-linear'."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names / regex to leave alone."}
    )
    rank_pattern: dict | None = field(default_factory=dict, metadata={"help": "Per-layer r overrides."})
    steps_per_iteration: int = field(default=200, metadata={"help": "Optimizer steps per iteration."})
    warmup_steps_per_iteration: int = field(
        default=20, metadata={"help": "LR re-warm-up steps per iteration."}
    )
    iterations_per_round: int | None = field(
        default=None, metadata={"help": "Iterations between re-SVDs; None = ceil(k / r) per layer."}
    )
    sampling: Literal["multinomial", "uniform", "top_r", "sequential"] = field(
        default="multinomial", metadata={"help": "How active indices are drawn."}
    )
    magnitude_mix: float = field(default=0.5, metadata={"help": "beta of the multinomial sampling."})
    enhanced_gradient: bool = field(default=True, metadata={"help": "Divide active-vector gradients by S_i."})
    mode: Literal["pretrain", "finetune"] = field(
        default="pretrain", metadata={"help": "pretrain | finetune"}
    )
    train_modules: list[str] | None = field(
        default=None, metadata={"help": "finetune mode: extra modules trained in place and saved."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules copied, trained and saved with the adapter (e.g. a head)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the index sampling."})
    frozen_factor_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "Storage dtype of the frozen U / Vh."}
    )
    init_weights: bool = field(default=True, metadata={"help": "SVD of the base weights at injection."})

    def __post_init__(self):
        super().__post_init__()
        from leanformers.sst.register import ensure_peft_type

        self.peft_type = ensure_peft_type()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self.rank_pattern = dict(self.rank_pattern or {})
        self._validate()

    def _validate(self) -> None:
        def positive_int(name: str, value, minimum: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"SSTConfig.{name} must be an integer >= {minimum}, got {value!r}")

        positive_int("r", self.r)
        positive_int("steps_per_iteration", self.steps_per_iteration)
        positive_int("warmup_steps_per_iteration", self.warmup_steps_per_iteration, 0)
        if self.warmup_steps_per_iteration >= self.steps_per_iteration:
            raise ValueError(
                f"SSTConfig.warmup_steps_per_iteration ({self.warmup_steps_per_iteration}) must be smaller than "
                f"steps_per_iteration ({self.steps_per_iteration})"
            )
        if self.iterations_per_round is not None:
            positive_int("iterations_per_round", self.iterations_per_round)
        for pattern, rank in self.rank_pattern.items():
            positive_int(f"rank_pattern[{pattern!r}]", rank)
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"SSTConfig.sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}")
        if not 0.0 <= float(self.magnitude_mix) <= 1.0:
            raise ValueError(f"SSTConfig.magnitude_mix must be in [0, 1], got {self.magnitude_mix!r}")
        if self.frozen_factor_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"SSTConfig.frozen_factor_dtype must be 'float32', 'bfloat16' or 'float16', got {self.frozen_factor_dtype!r}"
            )
        if self.mode not in MODES:
            raise ValueError(f"SSTConfig.mode must be 'pretrain' or 'finetune', got {self.mode!r}")
        if self.train_modules is not None and self.mode == "pretrain":
            raise ValueError(
                "SSTConfig.train_modules only applies to mode='finetune' (pretrain mode trains every non-SST "
                "parameter already); drop it or set mode='finetune'"
            )
        if self.target_modules is None or (
            isinstance(self.target_modules, (set, list)) and not self.target_modules
        ):
            raise ValueError("SSTConfig.target_modules is empty: pass module names, a regex or 'all-linear'")

    def rank_for(self, module_name: str) -> int:
        """r of the layer called ``module_name`` (``rank_pattern`` first, as in LoRA)."""
        import re

        for pattern, rank in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module_name):
                return int(rank)
        return int(self.r)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write adapter_config.json with ``init_weights=False``: the factors come from the saved weights."""
        import copy

        saved = copy.copy(self)
        saved.init_weights = False
        PeftConfig.save_pretrained(saved, save_directory, **kwargs)
