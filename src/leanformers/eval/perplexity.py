"""Perplexity over non-overlapping windows with exact token accounting."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from leanformers.data.text import evaluation_windows, load_text, tokenize_text

__all__ = ["PerplexityResult", "perplexity"]


@dataclass
class PerplexityResult:
    """Perplexity with what it was measured on. ``ppl = exp(nll / n_tokens)``."""

    ppl: float
    nll: float  # summed negative log-likelihood (nats)
    n_tokens: int  # predicted tokens (each window of L tokens predicts L - 1)
    n_windows: int
    seqlen: int

    def __str__(self) -> str:
        return (
            f"ppl {self.ppl:.3f} (context {self.seqlen}, {self.n_windows} windows, "
            f"{self.n_tokens:,} predicted tokens)"
        )


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer=None,
    text: str | torch.Tensor | None = None,
    seqlen: int = 2048,
    *,
    max_tokens: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a causal LM on ``text`` split into non-overlapping windows of ``seqlen``.

    Args:
        model: a causal LM returning ``.logits`` of shape (batch, seqlen, vocab).
        tokenizer: used when ``text`` is a string or a path.
        text: a string, a path to a text file (rows joined with "\\n\\n"), or a (N,) LongTensor of ids.
        seqlen: context length of each window.
        max_tokens: use only the first ``max_tokens`` tokens of the text.
        batch_size: windows per forward pass.
        device: where to run; defaults to the model's device.
    """
    if text is None:
        raise ValueError("pass the evaluation text (a string, a file path or token ids)")
    if isinstance(text, torch.Tensor):
        ids = text
    else:
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to evaluate raw text")
        if len(text) < 4096 and "\n" not in text and os.path.isfile(text):
            text = load_text(text)
        ids = tokenize_text(text, tokenizer)
    windows = evaluation_windows(ids, seqlen, max_tokens)
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    nll = 0.0
    n_tokens = 0
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            # Shifted next-token loss in float32, summed so that windows weigh by their token count.
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                batch[:, 1:].reshape(-1),
                reduction="sum",
            )
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss in evaluation window starting at {start}")
            nll += loss.item()
            n_tokens += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return PerplexityResult(math.exp(nll / n_tokens), nll, n_tokens, len(windows), seqlen)
