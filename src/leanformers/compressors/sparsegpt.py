"""2:4 SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot"): each linear is pruned column by column with the inverse-Hessian error compensation of
Optimal Brain Surgeon, H = X^T X + damping; the M - N inputs of every group of M to drop are chosen per
row by w^2 / [H^-1]_jj^2 when the group is reached."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leanformers.compression.compressor import register_compressor
from leanformers.compression.config import check_finite
from leanformers.compressors.semistructured import SemiStructuredCompressor, SemiStructuredConfig

__all__ = ["SparseGPTCompressor", "SparseGPTConfig", "sparsegpt_prune_weight"]


@torch.no_grad()
def sparsegpt_prune_weight(
    W: torch.Tensor, H: torch.Tensor, *, n: int = 2, m: int = 4, blocksize: int = 128, damp: float = 0.01
) -> torch.Tensor:
    """SparseGPT's N:M pruning of one weight: the pruned and compensated copy of ``W`` (float64).

    W: (rows, cols) weight acting on inputs x of width cols; H: (cols, cols) input Gram matrix
    sum_t x_t x_t^T (any positive scale). ``damp`` times the mean of diag(H) is added to the diagonal
    (dead inputs, diag 0, get weight 0). Columns are visited left to right; when column j starts a
    group of ``m`` the ``m - n`` entries of each row with the least w^2 / [H^-1]_jj^2 are dropped; each
    dropped or kept column's error is pushed onto the columns to its right through the upper Cholesky
    factor of H^-1 (lazily, ``blocksize`` columns at a time, which gives the same result as one column
    at a time). The output has exactly ``n`` non-zeros in every group of ``m`` (if W had them).
    """
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(
            f"H must be ({cols}, {cols}) for a weight of shape {tuple(W.shape)}, got {tuple(H.shape)}"
        )
    if cols % m or blocksize % m:
        raise ValueError(f"the width ({cols}) and blocksize ({blocksize}) must be multiples of m={m}")
    W = W.detach().double().clone()
    H = H.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diag(H).mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        drop = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % m == 0:
                saliency = W1[:, i : i + m] ** 2 / torch.diag(Hinv1)[i : i + m] ** 2
                drop[:, i : i + m].scatter_(1, saliency.topk(m - n, dim=1, largest=False).indices, True)
            w, d = W1[:, i], Hinv1[i, i]
            q = torch.where(drop[:, i], torch.zeros_like(w), w)
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


@dataclass
class SparseGPTConfig(SemiStructuredConfig):
    """2:4 SparseGPT (``pattern`` N:M).

    Attributes:
        damping: relative damping of H (times the mean of its diagonal), > 0 (1 % in the paper).
        blocksize: columns per lazy batch of the error compensation (a multiple of M; 128 in the paper).
    """

    damping: float = 0.01
    blocksize: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        self.damping = check_finite("damping", self.damping)
        if self.damping <= 0:
            raise ValueError(f"damping must be > 0 (H must be positive definite), got {self.damping}")
        self._check_int("blocksize", low=1)


@register_compressor
class SparseGPTCompressor(SemiStructuredCompressor):
    name = "sparsegpt-2:4"
    config_class = SparseGPTConfig
    config: SparseGPTConfig

    def prune(self, W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.blocksize % self.m:
            raise ValueError(f"blocksize {c.blocksize} must be a multiple of {self.m} (the pattern's M)")
        return sparsegpt_prune_weight(W, G, n=self.n, m=self.m, blocksize=c.blocksize, damp=c.damping)
