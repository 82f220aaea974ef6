"""The bench harness: what every bench script shares (see bench/README.md).

- ``parser(doc, name)``: an ArgumentParser with the two flags every script has, ``--quick`` (the
  seconds-long CPU variant the smoke tests run) and ``--output`` (where the result JSON goes);
  ``output_path(args, name)`` resolves the default ``bench/results/<name>[_quick].json``.
- ``environment(device)``: the machine and versions recorded with every result.
- ``sync`` / ``timed``: device-synchronised wall-clock timing.
- ``PeakRSS``: peak resident memory of this process over a block.
- ``print_table``: the plain-text table a script prints last.
- ``write_json``: atomic write of a result (a stopped run never leaves half a file).
- the model factory (``llama_config``, ``tiny_llama``, ``tiny_bert``) lives in tests/tiny_models.py,
  the one place that builds models from config; it is re-exported here.

Importing this module puts the repository root first on ``sys.path`` (for ``tests.tiny_models``) and
``src/`` last, so a script runs from a plain checkout as ``python bench/<script>.py`` while
``PYTHONPATH=<other checkout>/src`` still chooses which leanformers is measured (before/after runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results"
if str(REPO_ROOT) not in sys.path:  # ``tests.tiny_models``, the model factory
    sys.path.insert(0, str(REPO_ROOT))
if str(REPO_ROOT / "src") not in sys.path:  # last: PYTHONPATH or an install chooses the checkout first
    sys.path.append(str(REPO_ROOT / "src"))

from tests.tiny_models import llama_config, tiny_bert, tiny_llama  # noqa: E402

__all__ = [
    "REPO_ROOT",
    "RESULTS",
    "PeakRSS",
    "command_line",
    "environment",
    "llama_config",
    "output_path",
    "parser",
    "print_table",
    "sync",
    "timed",
    "tiny_bert",
    "tiny_llama",
    "write_json",
]


# ---- command line --------------------------------------------------------------------------------
def parser(doc: str | None, quick_help: str, output_help: str | None = None) -> argparse.ArgumentParser:
    """ArgumentParser with ``--quick`` and ``--output`` (the module docstring is the help text)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument(
        "--output",
        type=Path,
        default=None,
        help=output_help or "result JSON (default bench/results/<script>[_quick].json)",
    )
    return ap


def output_path(args: argparse.Namespace, name: str) -> Path:
    """``--output`` if given, else ``bench/results/<name>.json`` (``<name>_quick.json`` with --quick)."""
    if args.output is not None:
        return Path(args.output)
    return RESULTS / f"{name}{'_quick' if args.quick else ''}.json"


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that produced a result, as docs quote it (``python bench/<script>.py ...``)."""
    return f"python bench/{script}.py " + " ".join(argv if argv is not None else sys.argv[1:])


# ---- environment ---------------------------------------------------------------------------------
def describe_device(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device | str | None = None) -> dict:
    """Date, machine, CPU threads, library versions (and the GPU / the device when there is one)."""
    import peft
    import transformers

    import leanformers

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "leanformers": leanformers.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    if device is not None:
        env["device"] = describe_device(device)
    return env


# ---- timing --------------------------------------------------------------------------------------
def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work (a no-op on the CPU) so that a clock reading covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class _Elapsed:
    seconds: float = 0.0

    @property
    def ms(self) -> float:
        return self.seconds * 1000.0


@contextmanager
def timed(device: torch.device | str = "cpu") -> Iterator[_Elapsed]:
    """``with timed(device) as t: ...`` then ``t.seconds`` / ``t.ms``; synchronised at both ends."""
    elapsed = _Elapsed()
    sync(device)
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        sync(device)
        elapsed.seconds = time.perf_counter() - start


class PeakRSS:
    """Samples this process's resident memory every 50 ms; ``peak_gb`` after the block."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._proc = psutil.Process(os.getpid())
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_gb(self) -> float:
        return self.peak / 2**30


# ---- output --------------------------------------------------------------------------------------
def print_table(rows: list[dict], columns: list[str]) -> None:
    """Plain-text table of ``rows`` (dicts) in ``columns`` order; a missing cell prints empty."""
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def write_json(path: Path | str, payload: dict, indent: int = 2) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file, then rename); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=indent, default=str))
    tmp.replace(path)
    return path
