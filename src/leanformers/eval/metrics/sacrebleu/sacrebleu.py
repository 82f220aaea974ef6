"""``evaluate`` metric module "sacrebleu": corpus BLEU computed by the sacrebleu library.

Shipped with leanformers so that ``evaluate.load`` works offline (see leanformers.eval.metrics).
Written against evaluate's module API; the score is ``sacrebleu.corpus_bleu``'s, nothing is
re-implemented. Output keys follow the Hub module of the same name.
"""

import evaluate
import sacrebleu as scb

from leanformers.eval.metrics.shared import references_by_position, text_metric_info

_DESCRIPTION = "Corpus-level BLEU (sacrebleu.corpus_bleu) of detokenised predictions against references."
_KWARGS = """
Args:
    predictions: list of str, one hypothesis per segment.
    references: list of list of str, the references of each segment (same count for every segment).
    tokenize, lowercase, smooth_method, smooth_value, use_effective_order, force: sacrebleu options.
Returns:
    score (0-100), counts, totals, precisions, bp, sys_len, ref_len.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Sacrebleu(evaluate.Metric):
    def _info(self):
        return text_metric_info(
            _DESCRIPTION,
            _KWARGS,
            citation="Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018",
            homepage="https://github.com/mjpost/sacreBLEU",
        )

    def _compute(
        self,
        predictions,
        references,
        smooth_method="exp",
        smooth_value=None,
        force=False,
        lowercase=False,
        tokenize=None,
        use_effective_order=False,
    ):
        transposed = references_by_position(references, "sacrebleu")
        result = scb.corpus_bleu(
            predictions,
            transposed,
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            force=force,
            lowercase=lowercase,
            use_effective_order=use_effective_order,
            **({"tokenize": tokenize} if tokenize is not None else {}),
        )
        return {
            "score": result.score,
            "counts": result.counts,
            "totals": result.totals,
            "precisions": result.precisions,
            "bp": result.bp,
            "sys_len": result.sys_len,
            "ref_len": result.ref_len,
        }
