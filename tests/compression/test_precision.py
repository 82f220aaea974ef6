"""Numerical settings of a compression run: the per-linear algebra on one thread, side by side on the CPU."""

from __future__ import annotations

import threading

import pytest
import torch

from leanformers.compression.precision import map_single_threaded, single_threaded_linalg
from leanformers.compressors.mpifa import MPIFAConfig, mpifa_compress
from tests.tiny_models import random_ids, tiny_llama

CPU = torch.device("cpu")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _svd_of(seed: int) -> torch.Tensor:
    a = torch.randn(96, 48, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.linalg.svd(a, full_matrices=False).U


def test_results_are_the_serial_loops_bit_for_bit_and_in_order(two_threads):
    with single_threaded_linalg(CPU):
        serial = [_svd_of(s) for s in range(5)]
    side_by_side = map_single_threaded(_svd_of, list(range(5)), CPU)
    assert all(torch.equal(a, b) for a, b in zip(serial, side_by_side, strict=True))


def test_calls_run_side_by_side_each_on_one_thread_and_the_count_comes_back(two_threads):
    # Both calls must be inside fn at once: a serial loop would break the barrier (timeout).
    barrier = threading.Barrier(2, timeout=20)
    seen = []

    def fn(i):
        barrier.wait()
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return i

    assert map_single_threaded(fn, [0, 1], CPU) == [0, 1]
    assert len({ident for ident, _ in seen}) == 2 and all(n == 1 for _, n in seen)
    assert torch.get_num_threads() == 2


def test_one_thread_or_another_device_runs_the_plain_loop_here(two_threads):
    main = threading.get_ident()
    assert map_single_threaded(lambda i: threading.get_ident(), [0, 1], torch.device("meta")) == [main] * 2
    torch.set_num_threads(1)
    assert map_single_threaded(lambda i: threading.get_ident(), [0, 1], CPU) == [main] * 2


def test_the_first_error_reaches_the_caller(two_threads):
    def fn(i):
        if i == 1:
            raise ValueError("block 0 up_proj: degenerate")
        return i

    with pytest.raises(ValueError, match="up_proj: degenerate"):
        map_single_threaded(fn, [0, 1, 2], CPU)
    assert torch.get_num_threads() == 2


def test_mpifa_fitted_side_by_side_gives_the_serial_loops_bytes(two_threads, monkeypatch):
    """q/k/v and gate/up fitted side by side (2 threads) give the model the serial loop gives."""
    from leanformers.compressors import lowrank

    def serial(fn, items, device):
        with single_threaded_linalg(device):
            return [fn(x) for x in items]

    states = []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(lowrank, "map_single_threaded", serial)
        model = tiny_llama()
        config = MPIFAConfig(density=0.5, batch_size=4)
        mpifa_compress(model, None, config, random_ids(8, 32, seed=1), progress=False)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
