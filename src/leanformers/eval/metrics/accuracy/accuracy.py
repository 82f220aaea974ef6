"""``evaluate`` metric module "accuracy": scikit-learn's ``accuracy_score``.

Shipped with leanformers so that ``evaluate.load`` works offline (see leanformers.eval.metrics).
"""

import evaluate
from sklearn.metrics import accuracy_score

from leanformers.eval.metrics.shared import label_metric_info

_DESCRIPTION = "Fraction of predictions equal to their reference (sklearn.metrics.accuracy_score)."
_KWARGS = """
Args:
    predictions: list of int labels. references: list of int labels.
    normalize (True): fraction, else count. sample_weight: optional weights.
Returns:
    accuracy.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return label_metric_info(_DESCRIPTION, _KWARGS, "accuracy_score")

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        return {
            "accuracy": float(
                accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight)
            )
        }
