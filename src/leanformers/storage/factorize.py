"""PIFA (pivoting factorisation) from low-rank factors: pure maths, tensors in, tensors out.

A rank-r matrix W = U V (m x n, U: m x r, V: r x n) has r linearly independent rows P (the
pivot rows); every other row is a linear combination of them.

* row form:    W[P] = B (r x n),  W[NP] = C B with C ((m - r) x r)
* column form: W[:, P] = B (m x r),  W[:, NP] = B C with C (r x (n - r))

B is the "pivot weight", C the coefficients. Both forms store r (m + n) - r^2 numbers instead of
r (m + n). They are computed from the factors without forming W: QR with column pivoting on U^T
(row form) or on V (column form) picks P, one r x r solve gives C, and B = U[P] V (row) or
U V[:, P] (column). Pivots and non-pivots are returned SORTED ascending (the identity when
r = m or r = n, so that a full-rank factorisation stores W itself) as int32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "FORMS",
    "normalize_form",
    "PIFAFactors",
    "pifa_from_factors",
    "pifa_from_weight",
    "pifa_to_dense",
    "pivot_indices",
]

FORMS = ("row", "column")


class PIFAFactors(NamedTuple):
    """A PIFA matrix.

    pivot_weight: row form (r, n) = W[pivots]; column form (m, r) = W[:, pivots].
    coeff:        row form (m - r, r); column form (r, n - r).
    pivots:       (r,) int32, sorted.  nonpivots: (m - r,) or (n - r,) int32, sorted.
    form:         "row" or "column".
    """

    pivot_weight: torch.Tensor
    coeff: torch.Tensor
    pivots: torch.Tensor
    nonpivots: torch.Tensor
    form: str

    @property
    def rank(self) -> int:
        return int(self.pivots.numel())

    @property
    def shape(self) -> tuple[int, int]:
        """Shape (m, n) of the dense matrix represented."""
        r = self.rank
        if self.form == "row":
            return r + int(self.nonpivots.numel()), int(self.pivot_weight.shape[1])
        return int(self.pivot_weight.shape[0]), r + int(self.nonpivots.numel())


def normalize_form(form: str) -> str:
    """ "row" or "column" ("col" is accepted as an alias of "column")."""
    form = "column" if form == "col" else form
    if form not in FORMS:
        raise ValueError(f"form must be 'row' or 'column' (alias 'col'), got {form!r}")
    return form


def _qrcp_pivots_scipy(a: torch.Tensor, k: int) -> torch.Tensor:
    import scipy.linalg

    _, piv = scipy.linalg.qr(a.detach().cpu().double().numpy(), mode="r", pivoting=True)
    return torch.from_numpy(piv[:k].copy()).long()


def _qrcp_pivots_torch(a: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy column-pivoted Gram-Schmidt (the pivot rule of LAPACK geqp3), on a's device, no host sync.

    a: (r, d) float64. Returns the first k pivot columns (k,) int64.
    """
    r, d = a.shape
    basis = a.new_zeros(r, k)
    residual = a.clone()
    norms = residual.pow(2).sum(0)
    taken = torch.zeros(d, dtype=torch.bool, device=a.device)
    pivots = []
    for i in range(k):
        j = torch.argmax(torch.where(taken, torch.full_like(norms, -1.0), norms))
        q = residual.index_select(1, j.view(1)).squeeze(1)
        # Re-orthogonalise once against the basis: plain Gram-Schmidt loses orthogonality.
        q = q - basis[:, :i] @ (basis[:, :i].T @ q)
        q = q / q.norm().clamp_min(torch.finfo(q.dtype).tiny)
        basis[:, i] = q
        residual = residual - torch.outer(q, q @ residual)
        norms = residual.pow(2).sum(0)
        taken = taken.index_fill(0, j.view(1), True)
        pivots.append(j.view(1))
    return torch.cat(pivots)


def pivot_indices(a: torch.Tensor, k: int, method: str = "auto") -> torch.Tensor:
    """Indices of k well-conditioned columns of a (r x d) by QR with column pivoting.

    method "scipy" (LAPACK geqp3 on the CPU in float64), "torch" (same greedy rule on a's
    device), or "auto" (scipy for CPU tensors when installed, torch otherwise). Returns (k,) int64,
    in pivot order (not sorted).
    """
    if method not in ("auto", "scipy", "torch"):
        raise ValueError(f"method must be 'auto', 'scipy' or 'torch', got {method!r}")
    if method == "auto":
        try:
            import scipy.linalg  # noqa: F401

            method = "scipy" if a.device.type == "cpu" else "torch"
        except ImportError:
            method = "torch"
    if method == "scipy":
        return _qrcp_pivots_scipy(a, k).to(a.device)
    return _qrcp_pivots_torch(a.double(), k)


def _split(perm_first: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    pivots = torch.sort(perm_first).values
    mask = torch.ones(d, dtype=torch.bool, device=pivots.device)
    mask[pivots] = False
    nonpivots = torch.nonzero(mask).flatten()
    return pivots, nonpivots


def _check_basis(basis: torch.Tensor, which: str) -> None:
    """The r x r pivot block must be invertible in float64, else C blows up. Ill-conditioned but
    invertible blocks are accepted: the solve runs in float64."""
    s = torch.linalg.svdvals(basis)
    if not bool(s[-1] > s[0] * basis.shape[0] * 1e3 * torch.finfo(torch.float64).eps):
        raise ValueError(
            f"{which} is rank deficient (its pivot block is singular, condition {float(s[0] / s[-1]):.1e}): "
            "truncate the factors to their numerical rank"
        )


def pifa_from_factors(
    U: torch.Tensor, V: torch.Tensor, form: str = "row", method: str = "auto"
) -> PIFAFactors:
    """PIFA of W = U V without forming W.

    U: (m, r), V: (r, n), same dtype and device; r <= min(m, n) and U (row form) or V (column
    form) of full column/row rank r. Computed in float64, returned in U's dtype.
    """
    form = normalize_form(form)
    if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[0]:
        raise ValueError(
            f"expected U (m, r) and V (r, n) with the same r, got U {tuple(U.shape)} and V {tuple(V.shape)}"
        )
    m, r = U.shape
    n = V.shape[1]
    if r < 1 or r > min(m, n):
        raise ValueError(f"rank r = {r} must be in [1, min(m, n) = {min(m, n)}] for U {tuple(U.shape)}")
    if not (torch.isfinite(U).all() and torch.isfinite(V).all()):
        raise ValueError("U and V must be finite (found NaN or Inf)")
    out_dtype = U.dtype
    u, v = U.detach().double(), V.detach().to(U.device).double()
    if form == "row":
        pivots, nonpivots = _split(pivot_indices(u.T, r, method), m)
        basis = u[pivots]  # (r, r)
        _check_basis(basis, "U")
        # C = U[NP] U[P]^-1  <=>  U[P]^T C^T = U[NP]^T
        coeff = torch.linalg.solve(basis.T, u[nonpivots].T).T
        pivot_weight = basis @ v
    else:
        pivots, nonpivots = _split(pivot_indices(v, r, method), n)
        basis = v[:, pivots]  # (r, r)
        _check_basis(basis, "V")
        coeff = torch.linalg.solve(basis, v[:, nonpivots])
        pivot_weight = u @ basis
    if not (torch.isfinite(coeff).all() and torch.isfinite(pivot_weight).all()):
        which = "U" if form == "row" else "V"
        raise ValueError(
            f"{which} is rank deficient (its pivot block is singular): truncate the factors to their numerical rank"
        )
    return PIFAFactors(
        pivot_weight.to(out_dtype),
        coeff.to(out_dtype),
        pivots.to(torch.int32),
        nonpivots.to(torch.int32),
        form,
    )


def pifa_to_dense(factors: PIFAFactors) -> torch.Tensor:
    """The dense (m, n) matrix of a PIFA, in the factors' dtype (products accumulated in float32 or wider)."""
    normalize_form(factors.form)
    m, n = factors.shape
    b, c = factors.pivot_weight, factors.coeff
    acc = torch.promote_types(b.dtype, torch.float32)
    w = torch.empty(m, n, dtype=acc, device=b.device)
    piv, nonpiv = factors.pivots.long(), factors.nonpivots.long()
    if factors.form == "row":
        w[piv] = b.to(acc)
        w[nonpiv] = c.to(acc) @ b.to(acc)
    else:
        w[:, piv] = b.to(acc)
        w[:, nonpiv] = b.to(acc) @ c.to(acc)
    return w.to(b.dtype)


def pifa_from_weight(W: torch.Tensor, rank: int, form: str = "row", method: str = "auto") -> PIFAFactors:
    """PIFA of the best rank-``rank`` approximation of W (m, n) (truncated SVD, float64)."""
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D (out, in) matrix, got shape {tuple(W.shape)}")
    if not 1 <= rank <= min(W.shape):
        raise ValueError(f"rank must be in [1, {min(W.shape)}] for W {tuple(W.shape)}, got {rank}")
    u, s, vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    U = (u[:, :rank] * root).to(W.dtype)
    V = (root[:, None] * vh[:rank]).to(W.dtype)
    return pifa_from_factors(U, V, form=form, method=method)
