"""Shared helpers of the SST tests: fresh-process runs and a tiny Trainer set-up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def run_fresh(code: str, timeout: int = 240) -> str:
    """Run ``code`` in a new Python process (repo root and tests/ importable); return its stdout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO / "src"), env.get("PYTHONPATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"fresh process failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token sequences with labels (a causal-LM dataset for Trainer tests)."""

    def __init__(self, n: int = 64, seqlen: int = 16, vocab: int = 128, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seqlen), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_bert_classifier(seed: int = 0, num_labels: int = 3):
    """BertForSequenceClassification from config (the head ``classifier`` is a Linear(64, num_labels))."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
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
