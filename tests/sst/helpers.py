"""SST test helpers: a tiny classifier set-up (fresh-process runs and token data: tests/helpers.py)."""

from __future__ import annotations

import torch

from tests.helpers import REPO_ROOT, RandomTokens, run_fresh

REPO = REPO_ROOT
__all__ = ["REPO", "RandomClassification", "RandomTokens", "run_fresh", "tiny_bert_classifier"]


def tiny_bert_classifier(seed: int = 0, num_labels: int = 3):
    """BertForSequenceClassification from config (the head ``classifier`` is a Linear(64, num_labels))."""
    from transformers import BertForSequenceClassification

    from tests.tiny_models import tiny_bert_config

    torch.manual_seed(seed)
    cfg = tiny_bert_config(max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


class RandomClassification(torch.utils.data.Dataset):
    """Random token sequences labelled by their first token (learnable, so the head must move)."""

    def __init__(self, n: int = 32, seqlen: int = 12, vocab: int = 128, num_labels: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seqlen), generator=g)
        self.labels = self.ids[:, 0] % num_labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}
