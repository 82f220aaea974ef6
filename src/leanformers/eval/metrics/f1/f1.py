"""``evaluate`` metric module "f1": scikit-learn's ``f1_score``.

Shipped with leanformers so that ``evaluate.load`` works offline (see leanformers.eval.metrics).
"""

import evaluate
from sklearn.metrics import f1_score

from leanformers.eval.metrics.shared import label_metric_info

_DESCRIPTION = "F1 = 2 PR / (P + R) of the predictions (sklearn.metrics.f1_score)."
_KWARGS = """
Args:
    predictions: list of int labels. references: list of int labels.
    labels, pos_label (1), average ("binary"; "macro", "micro", "weighted" or None), sample_weight.
Returns:
    f1 (a float, or a list per label when average=None).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class F1(evaluate.Metric):
    def _info(self):
        return label_metric_info(_DESCRIPTION, _KWARGS, "f1_score")

    def _compute(
        self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None
    ):
        score = f1_score(
            references,
            predictions,
            labels=labels,
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
        )
        return {
            "f1": score.tolist() if hasattr(score, "tolist") and getattr(score, "ndim", 0) else float(score)
        }
