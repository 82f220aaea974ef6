"""``evaluate`` metrics that work offline: the modules the recipes use ship inside the package.

``load_metric("sacrebleu")`` returns ``evaluate.load("sacrebleu")``'s module from the Hub when it is
reachable, and otherwise (``HF_HUB_OFFLINE`` set, or the Hub call fails) loads the module of the
same name shipped in this folder by path. The shipped modules follow evaluate's module API and
delegate the scoring to sacrebleu / scikit-learn.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SHIPPED", "load_metric", "shipped_path"]

HERE = Path(__file__).resolve().parent
SHIPPED = ("sacrebleu", "chrf", "accuracy", "f1")


def shipped_path(name: str) -> Path:
    """The shipped module file of metric ``name``."""
    path = HERE / name / f"{name}.py"
    if not path.is_file():
        raise ValueError(
            f"metric {name!r} is not shipped with leanformers (shipped: {', '.join(SHIPPED)}); "
            "online, evaluate.load can fetch it from the Hub"
        )
    return path


def _offline() -> bool:
    return any(
        os.environ.get(var, "0").lower() not in ("0", "", "false", "no")
        for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE")
    )


def load_metric(name: str, *, prefer: str = "auto", **kwargs):
    """``evaluate.load`` of metric ``name``, offline-safe.

    Args:
        name: an evaluate metric name (``sacrebleu``, ``chrf``, ``accuracy``, ``f1``) or a path.
        prefer: ``auto`` (Hub when reachable, else the shipped module), ``shipped`` or ``hub``.
    """
    try:
        import evaluate
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("metrics need evaluate: pip install 'leanformers[eval]'") from exc
    if os.path.exists(name):
        return evaluate.load(name, **kwargs)
    if prefer == "shipped" or (prefer == "auto" and _offline() and name in SHIPPED):
        return evaluate.load(str(shipped_path(name)), **kwargs)
    try:
        return evaluate.load(name, **kwargs)
    except Exception:
        if prefer == "hub" or name not in SHIPPED:
            raise
        return evaluate.load(str(shipped_path(name)), **kwargs)


# Trainer key of each metric's score (the Trainer prefixes "eval_").
_KEYS = {"sacrebleu": "bleu", "chrf": "chrf", "accuracy": "accuracy", "f1": "f1"}


def translation_metrics(tokenizer, references: list[str], names=("sacrebleu", "chrf")):
    """``compute_metrics`` for Seq2SeqTrainer with ``predict_with_generate``: BLEU / chrF (0-100).

    Generated ids are decoded with ``tokenizer`` (special tokens skipped) and scored against the raw
    ``references`` (the evaluation targets in dataset order; the Trainer evaluates sequentially).

    The returned function's ``signatures`` dict holds, after each call, sacrebleu's signature of every
    sacrebleu-backed score (``bleu_signature``, ``chrf_signature``: ``nrefs:1|case:mixed|eff:no|
    tok:13a|smooth:exp|version:...``). The signature comes from a sacrebleu scorer with the options
    the metric module used; its score must equal the module's, else a RuntimeError is raised (a
    signature that does not describe the reported score would be wrong silently).
    """
    import numpy as np

    metrics = {name: load_metric(name) for name in names}
    signatures: dict[str, str] = {}

    def compute(eval_pred) -> dict[str, float]:
        preds = (
            eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        )
        preds = np.where(preds < 0, tokenizer.pad_token_id, preds)
        hypotheses = [s.strip() for s in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} predictions for {len(references)} references")
        refs = [[r] for r in references]
        out = {}
        for name, metric in metrics.items():
            key = _KEYS.get(name, name)
            out[key] = float(metric.compute(predictions=hypotheses, references=refs)["score"])
            if name in _SACREBLEU_SCORERS:
                signatures[f"{key}_signature"] = _sacrebleu_signature(name, hypotheses, references, out[key])
        return out

    compute.signatures = signatures
    return compute


# metric name -> sacrebleu scorer class; its defaults are the evaluate modules' defaults (shipped and Hub)
_SACREBLEU_SCORERS = {"sacrebleu": "BLEU", "chrf": "CHRF"}


def _sacrebleu_signature(name: str, hypotheses: list[str], references: list[str], score: float) -> str:
    """sacrebleu's signature of metric ``name`` with default options, checked against ``score``."""
    import sacrebleu

    scorer = getattr(sacrebleu, _SACREBLEU_SCORERS[name])()
    check = scorer.corpus_score(hypotheses, [references]).score
    if abs(check - score) > 1e-6:
        raise RuntimeError(
            f"{name}: evaluate reported {score} but sacrebleu's default {_SACREBLEU_SCORERS[name]} gives "
            f"{check}; the metric module used other options, so the default signature would not describe it"
        )
    return str(scorer.get_signature())


def classification_metrics(num_labels: int, names=("accuracy", "f1")):
    """``compute_metrics`` for a sequence classifier: accuracy, F1 (binary; macro for > 2 labels)."""
    import numpy as np

    metrics = {name: load_metric(name) for name in names}

    def compute(eval_pred) -> dict[str, float]:
        logits = (
            eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        )
        preds = np.asarray(logits).argmax(-1)
        out = {}
        for name, metric in metrics.items():
            kwargs = {"average": "binary" if num_labels == 2 else "macro"} if name == "f1" else {}
            result = metric.compute(predictions=preds, references=eval_pred.label_ids, **kwargs)
            out[_KEYS.get(name, name)] = float(result[_KEYS.get(name, name)])
        return out

    return compute
