"""``SSTConfig``: the PEFT configuration of Sparse Spectral Training."""

from __future__ import annotations

import copy
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from leanformers._compat import extend_peft_type
from leanformers.sst.sampling import SAMPLING_MODES

__all__ = ["IMPORT_REQUIRED", "SAVED_PEFT_TYPE", "SAVE_FORMATS", "SST_PEFT_TYPE", "SSTConfig"]

logger = logging.getLogger(__name__)

MODES = ("pretrain", "finetune")
SAVE_FORMATS = ("auto", "compact", "full")
CHOICES = {
    "sampling": SAMPLING_MODES,
    "frozen_factor_dtype": ("float32", "bfloat16", "float16"),
    "mode": MODES,
    "save_format": SAVE_FORMATS,
    "saved_format": (None, "compact", "full"),
}
SST_PEFT_TYPE = "SST"
# The peft_type written to adapter_config.json. peft looks it up in a registry that only `import leanformers`
# fills, and without it raises KeyError(<this string>): the error message then names its own fix. Read back
# as PeftType.SST (register.py); adapters saved as plain "SST" load too.
SAVED_PEFT_TYPE = "SST (needs `import leanformers` before loading)"
IMPORT_REQUIRED = "leanformers"
README_LINE = (
    "This is a leanformers SST adapter: run `import leanformers` before `PeftModel.from_pretrained` (it "
    "registers the SST PEFT type; without it peft raises a KeyError naming SST). It holds the {kind} state ({what})."
)
KIND_EXPLAINED = {
    "compact": "what fine-tuning changed; it must be loaded onto the base model it was trained from",
    "full": "every SST factor; it does not depend on the base model's weights",
}


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
            adapter_config.json carries ``False``; a compact adapter recomputes the base SVD on load).
        save_format: what ``save_pretrained`` writes: ``"auto"`` (default) a compact adapter in
            ``finetune`` mode and the full state in ``pretrain`` mode; ``"compact"``: always compact;
            ``"full"``: always the full state. Checkpoints written while ``SSTCallback`` drives a Trainer run
            are always full (resumable). Compact: per layer S, the active and touched singular-vector pairs,
            or the effective weight where smaller, at most the bytes of the targeted base weights; it reloads
            onto the base model it was trained from (``leanformers.sst.saving``).
        saved_format: what the adapter folder holds (``"compact"`` or ``"full"``), written by
            ``save_pretrained``; ``None`` before any save.
        import_required: a note for readers of adapter_config.json: loading this adapter needs
            ``import leanformers`` first.
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
    save_format: Literal["auto", "compact", "full"] = field(
        default="auto", metadata={"help": "auto (compact in finetune mode) | compact | full"}
    )
    saved_format: Literal["compact", "full"] | None = field(
        default=None, metadata={"help": "What the saved adapter holds (written by save_pretrained)."}
    )
    import_required: str = field(
        default=IMPORT_REQUIRED, metadata={"help": "Loading this adapter needs `import leanformers` first."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = extend_peft_type(SST_PEFT_TYPE)
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
        if not 0.0 <= float(self.magnitude_mix) <= 1.0:
            raise ValueError(f"SSTConfig.magnitude_mix must be in [0, 1], got {self.magnitude_mix!r}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                options = ", ".join(repr(a) for a in allowed[:-1]) + f" or {allowed[-1]!r}"
                raise ValueError(f"SSTConfig.{name} must be one of {options}, got {getattr(self, name)!r}")
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
        for pattern, rank in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module_name):
                return int(rank)
        return int(self.r)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write adapter_config.json (``init_weights=False``: the factors come from the saved weights; the
        peft_type names ``import leanformers``) and add a line saying so to the folder's README.md."""
        saved = copy.copy(self)
        saved.init_weights = False
        saved.peft_type = SAVED_PEFT_TYPE
        saved.saved_format = self.saved_format or "full"
        PeftConfig.save_pretrained(saved, save_directory, **kwargs)
        _add_readme_line(save_directory, saved.saved_format)
        logger.info("SST adapter written to %s: %s state", save_directory, saved.saved_format)


def _add_readme_line(save_directory: str, kind: str) -> None:
    """Put the ``import leanformers`` line into the adapter's model card (atomic write; one line, replaced)."""
    path = os.path.join(save_directory, "README.md")
    text = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    line = README_LINE.format(kind=kind, what=KIND_EXPLAINED[kind])
    kept = [existing for existing in text.splitlines() if not existing.startswith(README_LINE[:40])]
    body = "\n".join(kept).rstrip("\n")
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".README.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"{body}\n\n{line}\n" if body else f"{line}\n")
    os.replace(tmp, path)
