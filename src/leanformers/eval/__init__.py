"""Evaluation: perplexity over non-overlapping windows, zero-shot accuracy with lm-eval (offline
tasks on local files), and ``evaluate`` metrics for the Trainer.

lm-eval and evaluate are imported only when used (``pip install 'leanformers[eval]'``).
"""

from leanformers.eval.perplexity import PerplexityResult, perplexity
from leanformers.eval.tasks import LOCAL_TASKS
from leanformers.eval.zeroshot import accuracy_table, zero_shot

__all__ = ["LOCAL_TASKS", "PerplexityResult", "accuracy_table", "perplexity", "zero_shot"]
