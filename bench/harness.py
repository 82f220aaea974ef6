"""The bench harness: what every bench script shares (see bench/README.md).

Its parts are listed in bench/README.md ("Writing a runner").

Importing this module puts the repository root first on ``sys.path`` (for ``tests.tiny_models``) and
``src/`` last, so a script runs from a plain checkout as ``python bench/<script>.py`` while
``PYTHONPATH=<other checkout>/src`` still chooses which leanformers is measured (before/after runs).
"""

from __future__ import annotations

import argparse
import difflib
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results"
ROWS = REPO_ROOT / "bench" / "rows"
if str(REPO_ROOT) not in sys.path:  # ``tests.tiny_models``, the model factory
    sys.path.insert(0, str(REPO_ROOT))
if str(REPO_ROOT / "src") not in sys.path:  # last: PYTHONPATH or an install chooses the checkout first
    sys.path.append(str(REPO_ROOT / "src"))

# the model factory, re-exported for the runners (bench/README.md)
# the model factory, re-exported for the runners (bench/README.md)
from tests.tiny_models import llama_config, tiny_bert, tiny_llama  # noqa: E402, F401


# ---- command line --------------------------------------------------------------------------------
def parser(doc: str | None, quick_help: str, output_help: str | None = None) -> argparse.ArgumentParser:
    """ArgumentParser with ``--quick`` and ``--output`` (the module docstring is the help text)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    output_help = output_help or "result JSON (default bench/results/<script>[_quick].json)"
    ap.add_argument("--output", type=Path, default=None, help=output_help)
    return ap


def output_path(args: argparse.Namespace, name: str) -> Path:
    """``--output`` if given, else ``bench/results/<name>.json`` (``<name>_quick.json`` with --quick)."""
    if args.output is not None:
        return Path(args.output)
    return RESULTS / f"{name}{'_quick' if args.quick else ''}.json"


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that produced a result, as docs quote it (``python bench/<script>.py ...``)."""
    return f"python bench/{script}.py " + " ".join(argv if argv is not None else sys.argv[1:])


# ---- rows ----------------------------------------------------------------------------------------
def load_rows(runner: str, keys: Iterable[str] | Callable[[str, dict], Iterable[str]]) -> dict[str, dict]:
    """``bench/rows/<runner>.yaml``: row name -> settings, in file order.

    ``keys``: the keys a row may hold (a string: separated by spaces), or ``(name, row) -> keys`` when
    they depend on the row (a compressor's config fields). An unknown key is an error naming the row,
    the key and the close matches: a typo never silently runs the default.
    """
    import yaml

    path = ROWS / f"{runner}.yaml"
    rows = yaml.safe_load(path.read_text()) or {}
    if not isinstance(rows, dict) or not all(isinstance(r, dict) for r in rows.values()):
        raise ValueError(f"{path}: expected a mapping of row name -> settings")
    for name, row in rows.items():
        allowed = keys(name, row) if callable(keys) else keys
        allowed = set(allowed.split() if isinstance(allowed, str) else allowed)
        for key in row:
            if key not in allowed:
                near = difflib.get_close_matches(key, allowed, n=3)
                hint = f"; allowed: {', '.join(sorted(allowed))}"
                hint = f" (did you mean {', '.join(near)}?)" if near else hint
                raise ValueError(f"{path}: row {name!r} has unknown key {key!r}{hint}")
    return rows


def row_settings(name: str, row: dict, quick: bool = False, sets: Iterable[str] = ()) -> dict:
    """A row's settings for this run: its ``quick`` overrides with --quick, then ``--set KEY=VALUE``
    (VALUE read as YAML) on keys the row has; ``quick`` itself is dropped."""
    import yaml

    out = {k: v for k, v in row.items() if k != "quick"}
    if quick:
        out.update(row.get("quick") or {})
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or key not in out:
            raise ValueError(f"--set {item!r}: row {name!r} has no setting {key!r} (it has {', '.join(out)})")
        out[key] = yaml.safe_load(value)
    return out


def rows_arguments(
    ap: argparse.ArgumentParser, rows: dict[str, dict], default: list[str] | None = None
) -> None:
    """``--rows NAME...`` (choices: the rows file's names) and ``--set KEY=VALUE...`` (row settings)."""
    names = f"rows of bench/rows/ to run: {', '.join(rows)}"
    ap.add_argument("--rows", nargs="*", choices=list(rows), default=default, metavar="ROW", help=names)
    sets = "override a setting of the rows (VALUE is YAML)"
    ap.add_argument("--set", dest="sets", nargs="*", default=[], metavar="KEY=VALUE", help=sets)


def ascii_ids(text: str, n: int | None = None) -> torch.Tensor:
    """--quick data: the first ``n`` ASCII bytes of ``text`` as ids of a 128-token vocabulary."""
    return torch.tensor(list(text.encode("ascii", "replace")[:n]), dtype=torch.long).clamp_(max=127)


# ---- environment ---------------------------------------------------------------------------------
def environment(device: torch.device | str | None = None) -> dict:
    """Date, machine, CPU threads, library versions (and the GPU / the device when there is one)."""
    import peft
    import transformers

    import leanformers

    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine()}
    env |= {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__}
    env |= {"transformers": transformers.__version__, "peft": peft.__version__}
    env |= {"leanformers": leanformers.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    if device is not None:
        env["device"] = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else cpu
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


def interleaved(
    calls: dict[str, Callable[[int], object]], reps: int, warmup: int = 0, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Seconds of each call per repeat: within a repeat every call runs once, in an order rotated per
    repeat, so that no call always goes first; a call gets the repeat's index."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name](0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            with timed(device) as t:
                calls[name](rep)
            times[name].append(t.seconds)
    return times


def in_fresh_process(module: str, function: str, threads: int | None = None, **kwargs) -> dict:
    """``bench/<module>.py``'s ``function(**kwargs)`` in a new Python process; its result (a JSON dict)."""
    code = f"import json, sys; sys.path.insert(0, {str(REPO_ROOT / 'bench')!r}); import {module} as m; "
    code += f"print(json.dumps(m.{function}(**json.loads(sys.argv[1]))))"
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    command = [sys.executable, "-c", code, json.dumps(kwargs)]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{module}.{function} in a fresh process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- output --------------------------------------------------------------------------------------
def print_table(rows: list[dict], columns: list[str] | str | None = None) -> None:
    """Plain-text table of ``rows`` (dicts) in ``columns`` order (a string: names separated by spaces;
    default: the first row's keys); floats print with 4 significant digits, a missing cell empty."""
    columns = columns.split() if isinstance(columns, str) else columns or list(rows[0])
    cells = [
        {c: f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns}
        for r in rows
    ]
    widths = {c: max(len(c), *(len(r[c]) for r in cells)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for r in cells:
        print(" | ".join(r[c].ljust(widths[c]) for c in columns))


class ResultFile:
    """A result JSON filled in several runs: ``update(kind, entries, key)`` replaces the entries of list
    ``kind`` that share a key with the new ones and keeps the rest (and every other field). A file lock
    lets parallel processes fill one file; without ``merge`` the first update starts a fresh file."""

    def __init__(self, path: Path | str, merge: bool = True):
        self.path, self._fresh = Path(path), not merge

    def update(self, kind: str, entries: list[dict], key: Callable[[dict], object], **fields) -> dict:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = {} if self._fresh or not self.path.exists() else json.loads(self.path.read_text())
            self._fresh = False
            fresh = {key(e) for e in entries}
            old[kind] = [e for e in old.get(kind, []) if key(e) not in fresh] + entries
            payload = {**old, **fields}
            write_json(self.path, payload)
        return payload


def write_json(path: Path | str, payload: dict, indent: int = 2) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file, then rename); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=indent, default=str))
    tmp.replace(path)
    return path
