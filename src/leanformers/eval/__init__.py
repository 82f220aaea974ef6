"""Evaluation: perplexity over non-overlapping windows."""

from leanformers.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
