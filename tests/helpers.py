"""Helpers shared by the test folders: relative error, fresh-process runs, notebooks, token datasets.

(Fixtures stay in conftest.py files; this module holds plain functions and classes that tests import.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (Frobenius norm over all elements)."""
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- fresh processes -----------------------------------------------------------------------------
def fresh_env(**extra: str) -> dict[str, str]:
    """This environment, offline, with ``src/`` and the repository root importable first and ``tests/``
    last (so that ``import sst.helpers`` works, without its folders shadowing installed modules)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    paths = [str(REPO_ROOT / "src"), str(REPO_ROOT), env.get("PYTHONPATH", ""), str(REPO_ROOT / "tests")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def execute_notebook(path: Path, *, cwd: Path, timeout: int) -> str:
    """Execute the notebook at ``path`` top to bottom in a fresh kernel working in ``cwd``; returns the text
    its code cells printed (the notebook object is discarded).

    The kernel talks over IPC sockets, not TCP: a TCP kernel picks free ports, closes them, then binds
    them again, and a test binding ports meanwhile (the gloo tests, another notebook under xdist) took
    one; the kernel's heartbeat died and the client hung until pytest's timeout (CI, stop 36).
    """
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="kernel-") as sockets:
        # an absolute socket path: the kernel runs in ``cwd``, the client here, and a relative path
        # would name two different files
        km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(sockets, "ipc"))
        NotebookClient(
            nb, km=km, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
        ).execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def run_command(cmd: Sequence[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root in ``fresh_env(**env)``; the caller checks the result."""
    return subprocess.run(
        list(cmd), cwd=REPO_ROOT, env=fresh_env(**env), capture_output=True, text=True, timeout=timeout
    )


def run_python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) in a new Python interpreter; the caller checks the result."""
    return run_command([sys.executable, "-c", textwrap.dedent(code)], timeout=timeout)


def run_fresh(code: str, timeout: int = 240) -> str:
    """Run ``code`` in a new Python interpreter and return its stdout; a failure raises with stderr."""
    proc = run_python(code, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"fresh process failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


# ---- token datasets ------------------------------------------------------------------------------
class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token sequences with labels (a causal-LM dataset for Trainer tests)."""

    def __init__(self, n: int = 64, seqlen: int = 16, vocab: int = 128, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seqlen), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class SeededTokens(torch.utils.data.Dataset):
    """48 causal-LM rows of 16 tokens, row ``i`` drawn from seed ``i`` (``tests.tiny_models.random_ids``)."""

    def __len__(self) -> int:
        return 48

    def __getitem__(self, i):
        from tests.tiny_models import random_ids

        ids = random_ids(1, 16, seed=i)[0]
        return {"input_ids": ids, "labels": ids}


def cpu_training_args(output_dir, **overrides):
    """``TrainingArguments`` for a short, quiet, seeded CPU run; ``overrides`` replace any field."""
    from transformers import TrainingArguments

    kwargs = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "max_steps": 4,
        "logging_steps": 100,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def mpifa_cli_args(src, out, shared_data: Path, *extra: str) -> list[str]:
    """``mpifa-compress`` arguments for a tiny CPU run calibrated on 4 x 64 tokens of WikiText-2 v1 valid."""
    calib = str(shared_data / "wikitext-2-v1-valid.txt")
    return [str(src), "--output", str(out), "--calib", calib, "--nsamples", "4", "--seqlen", "64"] + [
        "--device",
        "cpu",
        *extra,
    ]
