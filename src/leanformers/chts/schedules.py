"""Schedules of one CHTss run, as pure functions of the update index.

Update ``u`` (1..U) happens after optimizer step ``u * interval``; U = number of updates inside the
topology window. Index 0 is the initial topology.
"""

from __future__ import annotations

import math

__all__ = [
    "density_at",
    "num_updates",
    "shaped_progress",
    "temperature_at",
    "update_index",
    "zeta_at",
]


def num_updates(total_steps: int, update_interval: int, topology_end: float = 0.75) -> int:
    """How many topology updates fit in the first ``topology_end`` of ``total_steps`` optimizer steps."""
    if update_interval <= 0 or total_steps <= 0:
        return 0
    # A tiny epsilon so that 0.75 * 400 == 300 counts the update at step 300 despite float error.
    window = math.floor(topology_end * total_steps + 1e-9)
    return window // update_interval


def update_index(step: int, update_interval: int, total_updates: int) -> int | None:
    """The update index (1..U) due after optimizer ``step`` (1-based), or None when no update is due."""
    if update_interval <= 0 or step <= 0 or step % update_interval:
        return None
    u = step // update_interval
    return u if u <= total_updates else None


def shaped_progress(u: float, total: int, kind: str = "sigmoid", k: float = 6.0) -> float:
    """Progress in [0, 1] of the density decay at update ``u`` of ``total``; exactly 0 at 0, 1 at total.

    sigmoid: (sigmoid(k'(u - U/2)) - 0.5) / (sigmoid(k) - sigmoid(-k)) + 0.5 with k' = 2k/U, the
    normalised sigmoid of CHTss; linear: u/U; cubic: 1 - (1 - u/U)^3 (gradual magnitude pruning).
    """
    if total <= 0 or u >= total:
        return 1.0
    if u <= 0:
        return 0.0
    x = u / total
    if kind == "linear":
        return x
    if kind == "cubic":
        return 1.0 - (1.0 - x) ** 3
    if kind != "sigmoid":
        raise ValueError(f"density schedule {kind!r} is not one of sigmoid, linear, cubic")

    def sig(z: float) -> float:
        return 1.0 / (1.0 + math.exp(-z))

    kp = 2.0 * k / total
    value = (sig(kp * (u - total / 2.0)) - 0.5) / (sig(k) - sig(-k)) + 0.5
    return min(1.0, max(0.0, value))


def density_at(
    u: int, total: int, initial: float, final: float, kind: str = "sigmoid", k: float = 6.0
) -> float:
    """Target density after update ``u``: ``initial`` at u = 0, exactly ``final`` at u >= total."""
    if total <= 0 or u >= total:
        return float(final)
    return float(initial + (final - initial) * shaped_progress(u, total, kind, k))


def zeta_at(u: int, total: int, zeta0: float, kind: str = "cosine") -> float:
    """Removal fraction at update ``u`` (1..U): cosine decay from ``zeta0`` towards 0 at the window's end.

    The cosine is evaluated at (u - 1) / U so that the first update removes ``zeta0`` and the last one
    still rewires a little; it reaches 0 only at the end of the window (u = U + 1, never executed).
    """
    if kind == "constant":
        return float(zeta0)
    if total <= 0:
        return 0.0
    x = min(max((u - 1) / total, 0.0), 1.0)
    return float(zeta0 * 0.5 * (1.0 + math.cos(math.pi * x)))


def temperature_at(u: int, total: int, start: float = 1.0, end: float = 9.0) -> float:
    """Soft-removal temperature: linear from ``start`` at the first update to ``end`` at the last."""
    if total <= 1:
        return float(start)
    x = min(max((u - 1) / (total - 1), 0.0), 1.0)
    return float(start + (end - start) * x)
