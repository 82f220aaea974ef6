"""``evaluate`` metric module "chrf": chrF / chrF++ computed by the sacrebleu library.

Shipped with leanformers so that ``evaluate.load`` works offline (see leanformers.eval.metrics).
The score is ``sacrebleu.corpus_chrf``'s (CHRF class); nothing is re-implemented.
"""

import datasets
import evaluate
from sacrebleu import CHRF

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
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Popovic, chrF: character n-gram F-score for automatic MT evaluation, WMT 2015",
            inputs_description=_KWARGS,
            homepage="https://github.com/mjpost/sacreBLEU#chrf--chrf",
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(
                            datasets.Value("string", id="sequence"), id="references"
                        ),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
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
        if references and isinstance(references[0], str):
            references = [[ref] for ref in references]
        counts = {len(refs) for refs in references}
        if len(counts) != 1:
            raise ValueError("chrF needs the same number of references for every prediction")
        transposed = [[refs[i] for refs in references] for i in range(counts.pop())]
        chrf = CHRF(char_order, word_order, beta, lowercase, whitespace, eps_smoothing)
        result = chrf.corpus_score(predictions, transposed)
        return {
            "score": result.score,
            "char_order": result.char_order,
            "word_order": result.word_order,
            "beta": result.beta,
        }
