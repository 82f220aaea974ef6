"""Healing by distillation: after compression, train the compressed layers' own factors to match the dense
model's next-token distributions (beyond the MPIFA paper, which is retraining-free; issue 20).

What trains: the pivot block (``weight``), the coefficients (``coeff``) and the bias of every PIFALinear, or
the two factors and the bias of every LowRankLinear. Nothing else changes (embeddings, norms, the head,
the uncompressed linears and every index buffer stay bit-identical), so the result is the same PIFA
checkpoint at the same ranks: ``save_compressed`` writes it and ``from_pretrained`` reloads it exactly.

Loss: KL(p_dense || p_compressed) per token at ``temperature`` (times T^2), averaged over the tokens of the
batch (``distillation_loss``, pure). Text: ``HealingConfig.calibration`` (default ``"self"``: windows the
dense model generates, compression/self_calibration.py), which is never an evaluation text. The loop is
the Hugging Face ``Trainer`` (accelerate underneath: devices, mixed precision, gradient accumulation), and
a run with ``output_dir`` saves checkpoints that ``resume=True`` continues from.

A run that ends with a higher KL than it started from (measured on the same training windows) is
discarded: the factors go back to their values before healing, the report says ``kept=False`` and a
warning names the KL and the learning rate. Healing that made the model worse is never handed on silently.
The guard lives in ``DistillationTrainer.train``, so ``heal()``, ``mpifa-compress --heal-tokens`` and the
``task: distill`` recipe of ``leanformers-train`` all have it.

2:4 pruned models are not healed here: their masks would have to be kept through every update.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from leanformers.compression.calibration import calibration_windows_for
from leanformers.compression.config import CompressionConfig, check_finite
from leanformers.storage.integration import compressed_modules

logger = logging.getLogger(__name__)

__all__ = [
    "DistillationTrainer",
    "HealingConfig",
    "HealingReport",
    "TokenWindows",
    "distillation_loss",
    "freeze_all_but_factors",
    "heal",
    "trainable_factors",
]


@dataclass
class HealingConfig:
    """Settings of a healing run.

    Attributes:
        tokens: training tokens in all (rounded up to whole windows of ``seqlen``); one pass over them.
        seqlen: tokens per training window.
        batch_size: windows per optimizer step (``gradient_accumulation`` micro-batches of
            batch_size / gradient_accumulation windows each).
        gradient_accumulation: micro-batches per step (memory: the logits of one micro-batch, V per token).
        learning_rate: peak AdamW learning rate (linear warm-up over ``warmup_ratio`` of the steps, then
            cosine decay to 0). 3e-5 was chosen on the validation texts (TED, torch source) over 1e-4, at
            densities 0.5 and 0.8 on SmolLM2-135M: 1e-4 raised the KL at 0.8 (docs/benchmarks.md §20).
        temperature: softmax temperature of the KL (1: the distributions themselves).
        calibration: the distillation text: ``"self"`` (the dense model's own text), a file, a mix, ...
            (anything ``calibration=`` takes). Never an evaluation text.
        seed: seed of the windows and of the Trainer.
        output_dir: where the Trainer writes its checkpoints (None: a temporary folder, no checkpoints).
        save_steps: checkpoint every this many steps (with ``output_dir``).
    """

    tokens: int = 65_536
    seqlen: int = 512
    batch_size: int = 4
    gradient_accumulation: int = 2
    learning_rate: float = 3e-5
    warmup_ratio: float = 0.1
    temperature: float = 1.0
    calibration: str = "self"
    seed: int = 0
    output_dir: str | None = None
    save_steps: int = 50

    def __post_init__(self) -> None:
        for name, low in (("tokens", 1), ("seqlen", 2), ("batch_size", 1), ("gradient_accumulation", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"healing {name} must be an integer >= {low}, got {value!r}")
        if self.batch_size % self.gradient_accumulation:
            raise ValueError(
                f"healing batch_size {self.batch_size} is not a multiple of gradient_accumulation "
                f"{self.gradient_accumulation}"
            )
        for name in ("learning_rate", "temperature"):
            if check_finite(f"healing {name}", getattr(self, name)) <= 0:
                raise ValueError(f"healing {name} must be > 0, got {getattr(self, name)}")
        if not 0 <= check_finite("healing warmup_ratio", self.warmup_ratio) < 1:
            raise ValueError(f"healing warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")

    @property
    def windows(self) -> int:
        return math.ceil(self.tokens / self.seqlen)


@dataclass
class HealingReport:
    """What a healing run did: tokens, steps, the KL before and after (on the first 8 training windows, in
    eval mode), whether the result was kept (False: the KL rose, the factors were restored), the trained
    parameter count, wall time and peak memory (CUDA, or the process's peak host RSS on CPU)."""

    tokens: int = 0
    steps: int = 0
    kl_before: float = 0.0
    kl_after: float = 0.0
    kept: bool = True
    trained_params: int = 0
    seconds: float = 0.0
    peak_memory_bytes: int | None = None
    calibration: str = ""
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """Mean over tokens of KL(p_teacher || p_student) at ``temperature``, times temperature^2.

    Args:
        student_logits, teacher_logits: (..., V) logits of the same tokens.
    Returns:
        a scalar tensor (differentiable in ``student_logits``).
    """
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return kl.mean() * (t * t)


def trainable_factors(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters healing trains: every parameter of every compressed layer (PIFA pivot block,
    coefficients and bias; low-rank factors and bias). ValueError when the model has no compressed layer."""
    modules = compressed_modules(model)
    if not modules:
        raise ValueError(
            "healing trains the factors of compressed layers (PIFA / low-rank), and this model has none: "
            "compress it with mpifa, svd-llm, asvd or svd first (2:4 pruned models are not healed)"
        )
    return {f"{name}.{p}": param for name, m in modules.items() for p, param in m.named_parameters()}


class TokenWindows(torch.utils.data.Dataset):
    """(n, seqlen) token windows as Trainer examples ``{"input_ids": (seqlen,)}`` (no labels: the
    teacher's distributions are the targets)."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i]}


class DistillationTrainer(Trainer):
    """The Hugging Face Trainer with KL(teacher || student) as its loss (``distillation_loss``).

    The teacher runs without gradients and follows the student's device on the first batch; everything
    else (optimizer, schedule, accumulation, checkpoints, resume, accelerate) is the Trainer's own.

    ``train`` is guarded (``discard_if_worse``, default on): it measures the mean KL on the first 8
    training windows before and after, and when the KL rose (or is not a number) it puts the trainable
    parameters back to their values on entry (a host copy of them is kept during the run), warns, and
    records ``kl_before`` / ``kl_after`` / ``kept`` on the trainer and in the returned metrics
    (``distill_kl_before``, ``distill_kl_after``, ``distill_kept``). On resume, "on entry" is the model as
    given (before the checkpoint loads), i.e. the model before any healing. Multi-process runs are not
    guarded (a sharded model cannot be measured and restored from one process); a warning says so.
    """

    def __init__(
        self, *args, teacher: nn.Module, temperature: float = 1.0, discard_if_worse: bool = True, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()
        self.temperature = float(temperature)
        self.discard_if_worse = discard_if_worse
        self.kl_before: float | None = None
        self.kl_after: float | None = None
        self.kept = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        if next(self.teacher.parameters()).device != ids.device:
            self.teacher.to(ids.device)
        with torch.no_grad():
            target = self.teacher(input_ids=ids).logits
        outputs = model(input_ids=ids)
        loss = distillation_loss(outputs.logits, target, self.temperature)
        return (loss, outputs) if return_outputs else loss

    def train(self, *args, **kwargs):
        if not self.discard_if_worse:
            return super().train(*args, **kwargs)
        if self.args.world_size > 1:
            logger.warning(
                "distillation on %d processes: the KL guard (discard a run that raised the KL) runs in "
                "single-process runs only; check the KL of the result yourself",
                self.args.world_size,
            )
            return super().train(*args, **kwargs)
        dataset = self.train_dataset
        windows = _guard_windows(dataset)
        params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        entry = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
        micro = self.args.per_device_train_batch_size
        self.kl_before = _mean_kl(self.model, self.teacher, windows, micro, self.temperature)
        result = super().train(*args, **kwargs)
        self.kl_after = _mean_kl(self.model, self.teacher, windows, micro, self.temperature)
        self.kept = not self.kl_after > self.kl_before  # a NaN KL is not kept either
        if not self.kept:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(entry[name])
            logger.warning(
                "healing discarded: the KL to the dense model rose from %.4g to %.4g on the training windows "
                "(learning rate %g, %d tokens); the compressed model is kept as it was before healing. Try a "
                "lower learning rate (HealingConfig.learning_rate; mpifa-compress --heal-lr; the distill "
                "recipe's training.learning_rate) or more tokens.",
                self.kl_before,
                self.kl_after,
                self.args.learning_rate,
                len(dataset) * windows.shape[1],
            )
        del entry
        result.metrics.update(
            distill_kl_before=self.kl_before, distill_kl_after=self.kl_after, distill_kept=self.kept
        )
        return result


def _guard_windows(dataset) -> torch.Tensor:
    """The KL guard's windows: (min(8, n), seqlen) ids from the first examples (tensors or lists, as a
    ``datasets.Dataset`` returns them). ValueError when there are none or they differ in length."""
    if len(dataset) == 0:
        raise ValueError(
            "the distillation training dataset is empty: give it at least one window of token ids "
            "(TokenWindows, or a recipe's `data` with enough text for one `data.seqlen` window)"
        )
    rows = [torch.as_tensor(dataset[i]["input_ids"], dtype=torch.long) for i in range(min(8, len(dataset)))]
    shapes = sorted({tuple(row.shape) for row in rows})
    if len(shapes) > 1 or len(shapes[0]) != 1:
        raise ValueError(
            f"the distillation KL guard measures the first 8 training examples as one batch, and their "
            f"input_ids have shapes {shapes}: give windows of one length (TokenWindows, or a recipe's "
            f"`data.seqlen`), or pass discard_if_worse=False to train without the guard"
        )
    return torch.stack(rows)


def freeze_all_but_factors(model: nn.Module) -> dict[str, nn.Parameter]:
    """Only the compressed layers' factors require gradients afterwards (in place); returns them."""
    params = trainable_factors(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    return params


@torch.no_grad()
def _mean_kl(
    student: nn.Module, teacher: nn.Module, windows: torch.Tensor, micro: int, temperature: float
) -> float:
    """The mean KL on ``windows`` (n, seqlen) in micro-batches of ``micro``, in eval mode (a cheap progress
    measure; the teacher moves to the student's device)."""
    was = student.training
    student.eval()
    device = next(student.parameters()).device
    teacher.to(device)
    total = 0.0
    for batch in windows.split(micro):
        batch = batch.to(device)
        loss = distillation_loss(
            student(input_ids=batch).logits, teacher(input_ids=batch).logits, temperature
        )
        total += float(loss) * batch.shape[0]
    student.train(was)
    return total / windows.shape[0]


def _trainer(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, cfg: HealingConfig, folder: str):
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=folder,
        per_device_train_batch_size=cfg.batch_size // cfg.gradient_accumulation,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        num_train_epochs=1,
        learning_rate=cfg.learning_rate,
        warmup_steps=round(cfg.warmup_ratio * math.ceil(windows.shape[0] / cfg.batch_size)),
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps" if cfg.output_dir else "no",
        save_steps=cfg.save_steps,
        logging_steps=10,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    return DistillationTrainer(
        model=student,
        args=args,
        train_dataset=TokenWindows(windows),
        teacher=teacher,
        temperature=cfg.temperature,
    )


def heal(
    model: nn.Module,
    teacher: nn.Module,
    tokenizer=None,
    config: HealingConfig | None = None,
    windows: torch.Tensor | None = None,
    *,
    resume: bool = False,
) -> HealingReport:
    """Distil ``teacher`` (the dense model) into the compressed ``model``, in place, training only the
    compressed layers' factors (see the module docstring).

    Args:
        model: a compressed model (``compress`` / ``mpifa_compress`` output, or one loaded with
            ``from_pretrained``), on its compute device.
        teacher: the dense model it was compressed from (same tokenizer), on the same device.
        tokenizer: needed for text (and chat prompting of ``"self"``) unless ``windows`` are given.
        config: a HealingConfig (defaults: 65,536 tokens of self-generated text).
        windows: (n, seqlen) token ids to train on instead of ``config.calibration``.
        resume: continue from the last checkpoint in ``config.output_dir``.
    Returns:
        A HealingReport. When the KL after training exceeds the KL before, the factors are restored to
        their values on entry (a host copy is kept during the run: the size of the factors) and
        ``report.kept`` is False.
    """
    cfg = config or HealingConfig()
    params = trainable_factors(model)
    start = time.perf_counter()
    if windows is None:
        spec = CompressionConfig(nsamples=cfg.windows, seqlen=cfg.seqlen, seed=cfg.seed)
        windows, label = calibration_windows_for(cfg.calibration, tokenizer, spec, model=teacher)
    else:
        label = f"{windows.shape[0]} x {windows.shape[1]} given token windows"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    teacher_mode = teacher.training
    teacher.eval()
    try:
        freeze_all_but_factors(model)
        with tempfile.TemporaryDirectory() as scratch:
            trainer = _trainer(model, teacher, windows, cfg, cfg.output_dir or scratch)
            result = trainer.train(resume_from_checkpoint=True if resume else None)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(frozen[name])
        teacher.train(teacher_mode)
        model.eval()
    report = HealingReport(
        tokens=int(windows.numel()),
        steps=int(result.global_step),
        kl_before=trainer.kl_before,
        kl_after=trainer.kl_after,
        kept=trainer.kept,
        trained_params=sum(p.numel() for p in params.values()),
        seconds=time.perf_counter() - start,
        calibration=label,
        config=asdict(cfg),
    )
    report.peak_memory_bytes = _peak_memory()
    return report


def _peak_memory() -> int | None:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
    except (ImportError, OSError):
        return None
