"""Density -> rank for PIFA and low-rank layers (pure integer maths).

Density rho is the kept fraction of the m * n weights of one targeted linear (m = out, n = in).
A low-rank pair U (m x r), V (r x n) stores r (m + n) numbers; a PIFA layer stores
r (m + n) - r^2 (the r x r identity block of the pivot rows is implicit).

``round_to`` rounds a rank DOWN to a multiple (for GEMM-friendly shapes) so that the parameter
budget is never exceeded; if no positive multiple fits, the unrounded rank is kept (>= 1) rather
than returning 0.
"""

from __future__ import annotations

import math

__all__ = ["lowrank_num_params", "lowrank_rank", "pifa_num_params", "pifa_rank"]


def _check(out_features: int, in_features: int, density: float, round_to: int | None) -> None:
    if (
        int(out_features) != out_features
        or int(in_features) != in_features
        or out_features < 1
        or in_features < 1
    ):
        raise ValueError(
            f"out_features and in_features must be positive integers, got {out_features} x {in_features}"
        )
    if not isinstance(density, (int, float)) or not math.isfinite(density) or not 0.0 < density <= 1.0:
        raise ValueError(
            f"density must be in (0, 1] (the kept fraction of the weights), got {density!r}; "
            "pass e.g. density=0.5 to keep half of the parameters"
        )
    if round_to is not None and (int(round_to) != round_to or round_to < 1):
        raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")


def _round_down(rank: int, round_to: int | None) -> int:
    if round_to is None or round_to <= 1:
        return rank
    rounded = (rank // round_to) * round_to
    return rounded if rounded >= 1 else rank


def pifa_num_params(m: int, n: int, r: int) -> int:
    """Stored weights of a rank-r PIFA layer: r n (pivot rows) + (m - r) r (coefficients) = r(m+n) - r^2."""
    return r * (m + n) - r * r


def lowrank_num_params(m: int, n: int, r: int) -> int:
    """Stored weights of a rank-r low-rank pair U (m x r), V (r x n): r (m + n)."""
    return r * (m + n)


def pifa_rank(out_features: int, in_features: int, density: float, round_to: int | None = None) -> int:
    """Largest r with r(m + n) - r^2 <= density * m * n, clipped to [1, min(m, n)].

    Solved in closed form (smaller root of r^2 - (m+n) r + rho m n = 0) and then corrected by
    integer checks, so float rounding can never push the rank over the budget.
    """
    _check(out_features, in_features, density, round_to)
    m, n = int(out_features), int(in_features)
    budget = density * m * n
    full = min(m, n)
    # r(m+n) - r^2 is increasing on [0, (m+n)/2] which contains [0, min(m, n)].
    disc = max((m + n) ** 2 - 4.0 * budget, 0.0)
    r = int(math.floor(((m + n) - math.sqrt(disc)) / 2.0))
    r = max(0, min(r, full))
    while r < full and pifa_num_params(m, n, r + 1) <= budget:
        r += 1
    while r > 0 and pifa_num_params(m, n, r) > budget:
        r -= 1
    return _round_down(max(1, r), round_to)


def lowrank_rank(out_features: int, in_features: int, density: float, round_to: int | None = None) -> int:
    """floor(density * m * n / (m + n)), clipped to [1, min(m, n)]."""
    _check(out_features, in_features, density, round_to)
    m, n = int(out_features), int(in_features)
    budget = density * m * n
    r = int(math.floor(budget / (m + n)))
    while lowrank_num_params(m, n, r) > budget and r > 0:  # guard float rounding
        r -= 1
    return _round_down(max(1, min(r, m, n)), round_to)
