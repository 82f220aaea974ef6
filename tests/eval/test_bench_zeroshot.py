"""bench/compression_table.py --zero-shot combines chunks of documents exactly as lm-eval aggregates the whole."""

from __future__ import annotations

import random
import sys

import pytest

from tests.conftest import REPO_ROOT

metrics = pytest.importorskip("lm_eval.api.metrics")
sys.path.insert(0, str(REPO_ROOT / "bench"))
from compression_table import combine  # noqa: E402


def test_chunks_combine_to_lm_evals_aggregate_of_all_documents():
    rng = random.Random(0)
    loglik = [-rng.uniform(0.1, 9.0) for _ in range(23)]
    correct = [float(rng.random() < 0.4) for _ in range(23)]
    cuts = [0, 5, 6, 17, 23]
    chunks = [
        {
            "n": b - a,
            "wall_s": 1.0,
            "acc": metrics.mean(correct[a:b]),
            "perplexity": metrics.perplexity(loglik[a:b]),
        }
        for a, b in zip(cuts, cuts[1:])
    ]
    cell = combine(chunks)
    assert cell["n"] == 23 and cell["wall_s"] == 4.0
    assert cell["acc"] == pytest.approx(metrics.mean(correct), rel=1e-12)
    assert cell["perplexity"] == pytest.approx(metrics.perplexity(loglik), rel=1e-12)
    assert "acc_norm" not in cell
