"""``evaluate`` metric module "chrf": chrF / chrF++ computed by the sacrebleu library.

Shipped with leanformers so that ``evaluate.load`` works offline (see leanformers.eval.metrics).
The score is ``sacrebleu.corpus_chrf``'s (CHRF class); nothing is re-implemented.
"""

import evaluate
from sacrebleu import CHRF

from leanformers.eval.metrics.shared import references_by_position, text_metric_info

_DESCRIPTION = "Corpus-level chrF (character n-gram F-score; chrF++ with word_order=2), from sacrebleu."
_KWARGS = """
Args:
    predictions: list of str.
    references: list of list of str (same number of references for every prediction).
    char_order (6), word_order (0; 2 = chrF++), beta (2), lowercase, whitespace, eps_smoothing.
Returns:
    score (0-100), char_order, word_order, beta.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ChrF(evaluate.Metric):
    def _info(self):
        return text_metric_info(
            _DESCRIPTION,
            _KWARGS,
            citation="Popovic, chrF: character n-gram F-score for automatic MT evaluation, WMT 2015",
            homepage="https://github.com/mjpost/sacreBLEU#chrf--chrf",
        )

    def _compute(
        self,
        predictions,
        references,
        char_order=CHRF.CHAR_ORDER,
        word_order=CHRF.WORD_ORDER,
        beta=CHRF.BETA,
        lowercase=False,
        whitespace=False,
        eps_smoothing=False,
    ):
        transposed = references_by_position(references, "chrF")
        chrf = CHRF(char_order, word_order, beta, lowercase, whitespace, eps_smoothing)
        result = chrf.corpus_score(predictions, transposed)
        return {
            "score": result.score,
            "char_order": result.char_order,
            "word_order": result.word_order,
            "beta": result.beta,
        }
