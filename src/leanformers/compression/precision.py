"""Numerical settings of a compression run: full-precision float32 matmuls, single-threaded small
linear algebra on the CPU, and the compute device."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["full_precision_matmul", "map_single_threaded", "resolve_device", "single_threaded_linalg"]

T = TypeVar("T")
R = TypeVar("R")


def _matmul_precision_state() -> tuple[str | None, str | None, str | None]:
    """(legacy global precision or None when unreadable, CUDA matmul fp32 precision, oneDNN matmul fp32
    precision); the last two are None on torch versions without the per-backend API."""
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # torch refuses to read it after a mix of the legacy and per-backend APIs
        legacy = None
    cuda = getattr(getattr(torch.backends.cuda, "matmul", None), "fp32_precision", None)
    mkldnn = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)
    return legacy, cuda, mkldnn


@contextlib.contextmanager
def full_precision_matmul():
    """Run float32 matmuls in full IEEE precision inside, whatever the user enabled outside.

    ``torch.backends.cuda.matmul.allow_tf32 = True`` or ``set_float32_matmul_precision("high")``
    (TF32, ~10-bit mantissa) or ``"medium"`` (bf16 on oneDNN) would otherwise reach the activations and
    the Gram products G, K, S: a 1e-3 relative error in S = X X^T breaks the whitening of small
    singular directions. The user's settings (legacy and per-backend) are restored on exit.
    """
    legacy, cuda, mkldnn = _matmul_precision_state()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        # Per-backend values last: restores states that mixed both APIs (where legacy is unreadable).
        if cuda is not None:
            torch.backends.cuda.matmul.fp32_precision = cuda
        if mkldnn is not None:
            torch.backends.mkldnn.matmul.fp32_precision = mkldnn


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def single_threaded_linalg(device: torch.device):
    """Run the per-module CPU linear algebra (SVD, QR, solves of at most a few thousand rows) on one
    thread: it gains little from threads and collapses under OpenMP oversubscription (a 1536 x 576
    float64 SVD measured 0.14 s on 1 thread vs 9.5 s on 2 threads on a loaded 2-core machine)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def map_single_threaded(fn: Callable[[T], R], items: Sequence[T], device: torch.device) -> list[R]:
    """``[fn(x) for x in items]`` with every call on one thread, as ``single_threaded_linalg`` runs it.

    On the CPU up to ``torch.get_num_threads()`` calls run at once (the independent linears of a group:
    gate and up, or q, k and v), each in a worker thread limited to one thread; the results are those of
    the serial loop, bit for bit (each call's arithmetic is unchanged), in the order of ``items``. Other
    devices, one item or one thread: the plain loop inside ``single_threaded_linalg``. The first error
    raised by a call is raised here.
    """
    workers = min(len(items), torch.get_num_threads()) if device.type == "cpu" else 1
    with single_threaded_linalg(device):
        if workers <= 1:
            return [fn(x) for x in items]
        # torch's thread count is per thread (OpenMP / MKL): each worker limits its own before any call.
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(fn, items))
