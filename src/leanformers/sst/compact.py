"""Compact SST adapters: what a fine-tuned layer stores beyond the base model it reloads onto (pure maths).

SST fine-tuning starts from the SVD U0 diag(S0) Vh0 of the base weight and then changes

- all of S (k numbers),
- the singular-vector pairs that were active at some point (written back into U / Vh: ``touched``),
- everything, once a re-SVD closed a round.

So until a layer's first re-SVD its complete state is: S, the active vectors, the indices and counters,
and the touched columns of U / rows of Vh; the other k - c pairs are those of the base weight's SVD,
recomputed on reload (:func:`leanformers.sst.spectral.thin_svd`, one thread: the same bits on the same
CPU and library build). This *spectral* entry costs k + (c + r)(m + n) numbers instead of the full
k(m + n). When it would not be smaller than the layer's dense weight (many pairs touched, or any
re-SVD), the layer is stored as its effective weight in the base dtype instead (*dense* entry: exactly
the bytes of the base weight). A compact adapter therefore never exceeds the targeted base weights.

Reload checks: ``sst_base_digest`` (a hash of the untouched pairs) proves the recomputed SVD bit-identical.
When it differs (another CPU, library build or device) ``sst_sketch``, a (p, p) float64 sketch
Q^T W_eff P of the effective weight, measures how far the reloaded weight is from the saved one.
"""

from __future__ import annotations

import hashlib

import torch

from leanformers.sst.spectral import effective_weight

__all__ = [
    "DIGEST_KEY",
    "RELOAD_TOLERANCE",
    "SKETCH_KEY",
    "SPECTRAL_ONLY_KEYS",
    "TOUCHED_KEYS",
    "compact_entry",
    "dense_entry",
    "entry_bytes",
    "factor_digest",
    "restore_spectral",
    "sketch_error",
    "spectral_entry",
    "weight_sketch",
]

TOUCHED_KEYS = ("sst_U_touched", "sst_Vh_touched")
DIGEST_KEY = "sst_base_digest"
SKETCH_KEY = "sst_sketch"
SPECTRAL_ONLY_KEYS = (*TOUCHED_KEYS, DIGEST_KEY, SKETCH_KEY)
SKETCH_SIZE = 8
# Relative Frobenius error of a reloaded effective weight (estimated by the sketch) above which the base
# model is taken for another one. float32 SVDs of one matrix on two machines differ by about 1e-7..1e-6; a
# base checkpoint in another dtype or another fine-tune of the same architecture differs by 1e-3 or more.
RELOAD_TOLERANCE = 1e-4


def factor_digest(U: torch.Tensor, Vh: torch.Tensor, touched: torch.Tensor) -> torch.Tensor:
    """(16,) uint8 BLAKE2b hash of the untouched columns of U and rows of Vh (their exact bytes)."""
    keep = touched == 0
    digest = hashlib.blake2b(digest_size=16)
    for part in (U[:, keep], Vh[keep]):
        flat = part.detach().contiguous().cpu().reshape(-1)
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return torch.tensor(list(digest.digest()), dtype=torch.uint8)


def weight_sketch(U, S, Vh, idx, U_active, Vh_active) -> torch.Tensor:
    """(p, p) float64 Q^T W_eff P with fixed Gaussian Q (m, p), P (n, p) (seeded by the shape).

    Costs p k (m + n): W_eff is never formed. ||sketch difference|| / ||sketch|| estimates the relative
    Frobenius distance of two effective weights.
    """
    m, n = U.shape[0], Vh.shape[1]
    gen = torch.Generator().manual_seed(1_000_003 * m + n)
    Q = torch.randn(m, SKETCH_SIZE, generator=gen, dtype=torch.float64).to(U.device)
    P = torch.randn(n, SKETCH_SIZE, generator=gen, dtype=torch.float64).to(U.device)
    U_eff = U.double().index_copy(1, idx, U_active.detach().double())
    Vh_eff = Vh.double().index_copy(0, idx, Vh_active.detach().double())
    return ((Q.t() @ U_eff) * S.detach().double()) @ (Vh_eff @ P)


def sketch_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative distance of two sketches (about that of the two effective weights)."""
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300))


def entry_bytes(entry: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in entry.values())


def spectral_entry(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The spectral entry of one layer from its full state (keys ``sst_U``, ``sst_S``, ... ``sst_touched``)."""
    U, Vh, touched = state["sst_U"], state["sst_Vh"], state["sst_touched"]
    mask = touched.bool()
    factors = (U, state["sst_S"], Vh, state["sst_index"], state["sst_U_active"], state["sst_Vh_active"])
    entry = {name: state[name] for name in ("sst_S", "sst_U_active", "sst_Vh_active", "sst_index")}
    entry.update(sst_counters=state["sst_counters"], sst_touched=touched)
    entry.update(sst_U_touched=U[:, mask].contiguous(), sst_Vh_touched=Vh[mask].contiguous())
    entry[DIGEST_KEY] = factor_digest(U, Vh, touched)
    entry[SKETCH_KEY] = weight_sketch(*factors)
    return entry


def dense_entry(state: dict[str, torch.Tensor], dtype: torch.dtype, key: str) -> dict[str, torch.Tensor]:
    """The layer as its effective weight (out, in) in ``dtype``, as the no-gradient forward computes it."""
    factors = (
        state[name] for name in ("sst_U", "sst_S", "sst_Vh", "sst_index", "sst_U_active", "sst_Vh_active")
    )
    return {key: effective_weight(*factors).to(dtype).contiguous()}


def compact_entry(
    state: dict[str, torch.Tensor], dtype: torch.dtype, dense_key: str
) -> dict[str, torch.Tensor]:
    """The smaller of the spectral entry and the dense entry (``dense_key``, (out, in) in ``dtype``)."""
    U, Vh = state["sst_U"], state["sst_Vh"]
    m, n = U.shape[0], Vh.shape[1]
    dense_bytes = m * n * torch.empty((), dtype=dtype).element_size()
    touched = int(state["sst_touched"].count_nonzero())
    spectral_bytes = touched * (m + n) * U.element_size() + sum(
        state[name].numel() * state[name].element_size()
        for name in ("sst_S", "sst_U_active", "sst_Vh_active", "sst_index", "sst_counters", "sst_touched")
    )
    if (
        touched < state["sst_touched"].numel() and spectral_bytes + 1024 < dense_bytes
    ):  # 1 KiB: digest, sketch
        return spectral_entry(state)
    return dense_entry(state, dtype, dense_key)


@torch.no_grad()
def restore_spectral(
    entry: dict[str, torch.Tensor], U: torch.Tensor, Vh: torch.Tensor, U0: torch.Tensor, Vh0: torch.Tensor
) -> float | None:
    """Fill U (m, k) and Vh (k, n) in place from the base SVD (U0, Vh0) and a spectral entry.

    Returns None when the untouched pairs are bit-identical to those the adapter was trained with (the
    digest matches: the restored state is exact), else the estimated relative error of the effective weight.
    """
    mask = entry["sst_touched"].to(U.device).bool()
    U.copy_(U0)
    Vh.copy_(Vh0)
    U[:, mask] = entry["sst_U_touched"].to(U.device, U.dtype)
    Vh[mask] = entry["sst_Vh_touched"].to(Vh.device, Vh.dtype)
    if torch.equal(factor_digest(U, Vh, mask.to(torch.uint8)), entry[DIGEST_KEY].cpu()):
        return None
    factors = (U, entry["sst_S"], Vh, entry["sst_index"], entry["sst_U_active"], entry["sst_Vh_active"])
    return sketch_error(weight_sketch(*(t.to(U.device) for t in factors)), entry[SKETCH_KEY])
