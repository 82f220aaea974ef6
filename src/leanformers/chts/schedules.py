"""Schedules of one CHTss run, as pure functions of the update index.

Update ``u`` (1..U) happens after optimizer step ``u * interval``; U = number of updates inside the
topology window. Index 0 is the initial topology.

The choices of a config are registries here, next to their formulas: :data:`PROGRESS_SHAPES` (how the
density decays), :data:`DENSITY_SCHEDULES` (what an update targets), :data:`ZETA_SCHEDULES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AUTO_INTERVAL_MAX",
    "AUTO_MIN_UPDATES",
    "DENSITY_SCHEDULES",
    "PROGRESS_SHAPES",
    "SCHEDULE_CLOCKS",
    "ZETA_SCHEDULES",
    "UpdateSchedule",
    "auto_update_interval",
    "density_at",
    "em_s_extra",
    "num_updates",
    "shaped_progress",
    "temperature_at",
    "temperature_at_step",
    "update_index",
    "update_schedule",
    "zeta_at",
    "zeta_at_step",
]


def num_updates(total_steps: int, update_interval: int, topology_end: float = 0.75) -> int:
    """How many topology updates fit in the first ``topology_end`` of ``total_steps`` optimizer steps."""
    if update_interval <= 0 or total_steps <= 0:
        return 0
    # A tiny epsilon so that 0.75 * 400 == 300 counts the update at step 300 despite float error.
    window = math.floor(topology_end * total_steps + 1e-9)
    return window // update_interval


# update_interval="auto": the reference LLM interval (100 optimizer steps) for long runs, shortened on
# short ones so that the topology window still holds at least AUTO_MIN_UPDATES updates.
AUTO_INTERVAL_MAX = 100
# when zeta and T are evaluated: "update" (the update index) or "step" (the reference code's s / T_end)
SCHEDULE_CLOCKS = ("update", "step")
AUTO_MIN_UPDATES = 10


def auto_update_interval(total_steps: int, topology_end: float = 0.75) -> int:
    """``min(100, max(1, window // 10))`` with ``window = floor(topology_end * total_steps)``.

    10,000 steps (window 7,500): 100, as the reference recipes; 100 steps (window 75): 7, so 10 updates.
    """
    window = math.floor(topology_end * max(0, int(total_steps)) + 1e-9)
    return min(AUTO_INTERVAL_MAX, max(1, window // AUTO_MIN_UPDATES))


def update_index(step: int, update_interval: int, total_updates: int) -> int | None:
    """The update index (1..U) due after optimizer ``step`` (1-based), or None when no update is due."""
    if update_interval <= 0 or step <= 0 or step % update_interval:
        return None
    u = step // update_interval
    return u if u <= total_updates else None


def _sigmoid_progress(u: float, total: int, k: float) -> float:
    # (sigmoid(k'(u - U/2)) - 0.5) / (sigmoid(k) - sigmoid(-k)) + 0.5 with k' = 2k/U
    def sig(z: float) -> float:
        return 1.0 / (1.0 + math.exp(-z))

    kp = 2.0 * k / total
    return (sig(kp * (u - total / 2.0)) - 0.5) / (sig(k) - sig(-k)) + 0.5


# (u, U, k) -> progress; called with 0 < u < U
PROGRESS_SHAPES: dict[str, Callable[[float, int, float], float]] = {
    "sigmoid": _sigmoid_progress,  # CHTss
    "linear": lambda u, total, k: u / total,
    "cubic": lambda u, total, k: 1.0 - (1.0 - u / total) ** 3,  # gradual magnitude pruning
}


def shaped_progress(u: float, total: int, kind: str = "sigmoid", k: float = 6.0) -> float:
    """Progress in [0, 1] of the density decay at update ``u`` of ``total``; exactly 0 at 0, 1 at total.

    sigmoid: (sigmoid(k'(u - U/2)) - 0.5) / (sigmoid(k) - sigmoid(-k)) + 0.5 with k' = 2k/U, the
    normalised sigmoid of CHTss; linear: u/U; cubic: 1 - (1 - u/U)^3 (gradual magnitude pruning).
    """
    if kind not in PROGRESS_SHAPES:
        raise ValueError(f"density schedule {kind!r} is not one of {sorted(PROGRESS_SHAPES)}")
    if total <= 0 or u >= total:
        return 1.0
    if u <= 0:
        return 0.0
    return min(1.0, max(0.0, PROGRESS_SHAPES[kind](u, total, k)))


def density_at(
    u: int, total: int, initial: float, final: float, kind: str = "sigmoid", k: float = 6.0
) -> float:
    """Target density after update ``u``: ``initial`` at u = 0, exactly ``final`` at u >= total."""
    if total <= 0 or u >= total:
        return float(final)
    return float(initial + (final - initial) * shaped_progress(u, total, kind, k))


ZETA_SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "cosine": lambda x, zeta0: zeta0 * 0.5 * (1.0 + math.cos(math.pi * x)),  # zeta0 at x = 0, 0 at x = 1
    "constant": lambda x, zeta0: zeta0,
}


def _zeta(kind: str, x: float, zeta0: float) -> float:
    if kind not in ZETA_SCHEDULES:
        raise ValueError(f"zeta schedule {kind!r} is not one of {sorted(ZETA_SCHEDULES)}")
    return float(ZETA_SCHEDULES[kind](min(max(x, 0.0), 1.0), float(zeta0)))


def zeta_at(u: int, total: int, zeta0: float, kind: str = "cosine") -> float:
    """Removal fraction at update ``u`` (1..U): cosine decay from ``zeta0`` towards 0 at the window's end.

    The cosine is evaluated at (u - 1) / U so that the first update removes ``zeta0`` and the last one
    still rewires a little; it reaches 0 only at the end of the window (u = U + 1, never executed).
    """
    if total <= 0 and kind != "constant":
        return 0.0
    return _zeta(kind, (u - 1) / max(total, 1), zeta0)


def temperature_at(u: int, total: int, start: float = 1.0, end: float = 9.0) -> float:
    """Soft-removal temperature: linear from ``start`` at the first update to ``end`` at the last."""
    if total <= 1:
        return float(start)
    x = min(max((u - 1) / (total - 1), 0.0), 1.0)
    return float(start + (end - start) * x)


# --------------------------------------------------------------------- the official code's clock
# The reference implementations evaluate zeta and T at the optimizer step s of the update divided by
# the end of the topology window T_end (in steps), not at the update index: see docs/chtss.md.


def zeta_at_step(step: int, t_end: float, zeta0: float, kind: str = "cosine") -> float:
    """Official removal fraction: zeta0 / 2 * (1 + cos(pi * step / T_end)) (cosine), or zeta0 (constant).

    The first update (step = interval) removes a little less than ``zeta0``; an update at
    step = T_end removes nothing.
    """
    if t_end <= 0 and kind != "constant":
        return 0.0
    return _zeta(kind, step / t_end if t_end > 0 else 0.0, zeta0)


def temperature_at_step(step: int, t_end: float, start: float = 1.0, end: float = 9.0) -> float:
    """Official soft-removal temperature: start + (end - start) * step / T_end."""
    if t_end <= 0:
        return float(start)
    x = min(max(step / t_end, 0.0), 1.0)
    return float(start + (end - start) * x)


def em_s_extra(step: int, t_end: float, interval: int, boost: float) -> float:
    """EM_S density above the final one after the update at ``step`` (the official MLP CHTs schedule).

    ``boost`` while step <= 0.6 T_end, ``boost / 2`` while step < T_end - interval, 0 afterwards (the
    last updates only prune to the final density).
    """
    if step <= 0.6 * t_end:
        return float(boost)
    if step < t_end - interval:
        return float(boost) / 2.0
    return 0.0


@dataclass(frozen=True)
class UpdateSchedule:
    """What update ``u`` does. Densities are fractions of each matrix (or of the ERK budget).

    Attributes:
        density: link density after the update (the regrowth target).
        zeta: fraction of the active links removed (for EM_S: the fraction its pruning removes).
        temperature: exponent T of the soft removal.
        keep_density: EM_S only: the removal keeps exactly this density (zeta is not used); None
            otherwise.
    """

    density: float
    zeta: float
    temperature: float
    keep_density: float | None = None


def _em_s_schedule(config: Any, u: int, total_updates: int, total_steps: int | None, interval: int):
    """EM_S: regrow to final + extra(step), keep exactly the final density at the removal."""
    step = u * interval
    t_end = math.floor(config.topology_end * (total_steps or 0) + 1e-9)
    boost, final = config.em_s_boost, config.final_density
    before = config.initial_density if u <= 1 else final + em_s_extra(step - interval, t_end, interval, boost)
    density = min(1.0, final + em_s_extra(step, t_end, interval, boost))
    return density, 1.0 - final / before, final


def _decay_schedule(config: Any, u: int, total_updates: int, total_steps: int | None, interval: int):
    """Decay from initial to final density along ``PROGRESS_SHAPES[density_schedule]``."""
    if config.density_end is None:
        density_updates = total_updates
    else:
        density_updates = num_updates(total_steps or 0, interval, config.density_end)
    density = density_at(
        u,
        density_updates,
        config.initial_density,
        config.final_density,
        config.density_schedule,
        config.sigmoid_k,
    )
    return density, None, None


# (config, u, U, total_steps, interval) -> (density, zeta override or None, keep_density or None)
DENSITY_SCHEDULES: dict[str, Callable] = {
    **dict.fromkeys(PROGRESS_SHAPES, _decay_schedule),
    "em_s": _em_s_schedule,  # the reference MLP CHTs schedule
}


def update_schedule(
    config: Any, u: int, total_updates: int, total_steps: int | None, interval: int | None = None
) -> UpdateSchedule:
    """Schedule values of update ``u`` (1..U) of a run of ``total_steps`` optimizer steps.

    ``config`` is a CHTssConfig; ``interval`` the update interval in steps (default: the config's,
    "auto" resolved for ``total_steps``).

    ``config.schedule_clock``: "update" evaluates zeta at (u - 1) / U and T at (u - 1) / (U - 1) (the
    package's default: the first update removes exactly zeta, T spans the whole range); "step"
    evaluates both at s / T_end with s = u * update_interval and T_end = topology_end * total_steps,
    as the reference code does. The density decay runs over ``density_end`` (default: the topology
    window), so that it reaches ``final_density`` exactly at the last update.
    """
    cfg = config
    if interval is None:
        interval = cfg.update_interval
        if interval == "auto":
            interval = auto_update_interval(total_steps or 0, cfg.topology_end)
    interval = int(interval)
    step = u * interval
    t_end = math.floor(cfg.topology_end * (total_steps or 0) + 1e-9)
    if cfg.schedule_clock == "step":
        zeta = zeta_at_step(step, t_end, cfg.zeta, cfg.zeta_schedule)
        temperature = temperature_at_step(step, t_end, cfg.temperature_start, cfg.temperature_end)
    else:
        zeta = zeta_at(u, total_updates, cfg.zeta, cfg.zeta_schedule)
        temperature = temperature_at(u, total_updates, cfg.temperature_start, cfg.temperature_end)
    if cfg.density_schedule not in DENSITY_SCHEDULES:
        raise ValueError(
            f"density_schedule={cfg.density_schedule!r} is not one of {sorted(DENSITY_SCHEDULES)}"
        )
    density, zeta_override, keep = DENSITY_SCHEDULES[cfg.density_schedule](
        cfg, u, total_updates, total_steps, interval
    )
    return UpdateSchedule(density, zeta if zeta_override is None else zeta_override, temperature, keep)
