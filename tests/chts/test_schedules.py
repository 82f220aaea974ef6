"""Schedules: sigmoid density decay with exact endpoints, cosine zeta, linear temperature."""

from __future__ import annotations

import math

import pytest

from leanformers.chts import schedules


@pytest.mark.parametrize("kind", ["sigmoid", "linear", "cubic"])
@pytest.mark.parametrize(
    "initial,final,interval,total_steps",
    [
        (0.5, 0.3, 100, 4000),
        (0.5, 0.01, 10, 1000),
        (1.0, 0.1, 7, 333),
        (0.9, 0.9, 5, 100),
        (0.6, 0.05, 1, 12),
    ],
)
def test_density_starts_at_initial_and_ends_exactly_at_final(kind, initial, final, interval, total_steps):
    total = schedules.num_updates(total_steps, interval, 0.75)
    assert total >= 1
    values = [schedules.density_at(u, total, initial, final, kind) for u in range(total + 1)]
    assert values[0] == initial
    assert values[-1] == final  # exact, not 10.11 % for 10 %
    assert all(a >= b for a, b in zip(values[:-1], values[1:]))  # monotone decay
    # The last update is inside the topology window.
    assert total * interval <= 0.75 * total_steps + 1e-9


def test_sigmoid_shape_is_symmetric_and_normalised():
    total = 40
    mid = schedules.shaped_progress(20, total, "sigmoid", 6.0)
    assert mid == pytest.approx(0.5)
    for u in range(total + 1):
        a = schedules.shaped_progress(u, total, "sigmoid", 6.0)
        b = schedules.shaped_progress(total - u, total, "sigmoid", 6.0)
        assert a + b == pytest.approx(1.0)
    # Steep in the middle, flat at the ends (k = 6).
    assert schedules.shaped_progress(2, total) < 2 / total
    with pytest.raises(
        ValueError, match=r"density schedule .exp. is not one of \[.cubic., .linear., .sigmoid.\]"
    ):
        schedules.shaped_progress(1, 10, "exp")


def test_num_updates_and_update_index():
    assert schedules.num_updates(400, 100, 0.75) == 3
    assert schedules.num_updates(1000, 100, 0.75) == 7
    assert schedules.num_updates(50, 100, 0.75) == 0
    assert schedules.num_updates(100, 0, 0.75) == 0
    assert schedules.update_index(300, 100, 3) == 3
    assert schedules.update_index(400, 100, 3) is None  # after topology_end: frozen
    assert schedules.update_index(150, 100, 3) is None


def test_zeta_cosine_and_temperature_ramp():
    total = 10
    zetas = [schedules.zeta_at(u, total, 0.3) for u in range(1, total + 1)]
    assert zetas[0] == pytest.approx(0.3)
    assert all(a > b for a, b in zip(zetas[:-1], zetas[1:]))
    assert zetas[-1] == pytest.approx(0.3 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert schedules.zeta_at(11, total, 0.3) == pytest.approx(0.0)
    assert schedules.zeta_at(5, total, 0.3, "constant") == 0.3
    temps = [schedules.temperature_at(u, total, 1.0, 9.0) for u in range(1, total + 1)]
    assert temps[0] == 1.0 and temps[-1] == 9.0
    assert temps[4] - temps[3] == pytest.approx(8.0 / 9.0)


@pytest.mark.parametrize(
    ("total_steps", "topology_end", "interval"),
    [
        (10_000, 0.75, 100),
        (100_000, 0.75, 100),
        (1_000, 0.75, 75),
        (100, 0.75, 7),
        (20, 0.75, 1),
        (1, 0.75, 1),
    ],
)
def test_auto_update_interval_scales_with_the_run(total_steps, topology_end, interval):
    assert schedules.auto_update_interval(total_steps, topology_end) == interval
    window_updates = schedules.num_updates(total_steps, interval, topology_end)
    assert window_updates >= min(10, int(topology_end * total_steps))  # at least 10 updates when they fit


def test_auto_interval_is_resolved_by_the_pure_schedule_too():
    from leanformers.chts import CHTssConfig

    auto = CHTssConfig(final_density=0.3)
    explicit = CHTssConfig(final_density=0.3, update_interval=7)
    for u in (1, 5, 10):
        assert schedules.update_schedule(auto, u, 10, 100) == schedules.update_schedule(explicit, u, 10, 100)
