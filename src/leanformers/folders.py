"""Writing output folders and files so that nothing is lost and nothing half-written is left behind.

* ``check_output``: refuse an output that is a symlink, that holds or lies inside a protected path (the
  source model), or that is occupied without ``overwrite``.
* ``staging_folder``: a hidden folder beside the output whose name carries host, pid and the process's
  start time; ``clean_stale`` removes those of dead processes on this host (an interrupted run), restores
  an output that a dead process had moved aside, and names (never touches) another host's.
* ``replace_folder``: fsync every file, then the folder, then rename it into place, re-checking the output
  at that moment (it may have appeared during a long run).
* ``write_text_atomic``: the same for one file (reports).
* ``fault_point``: test-only crash points (``LEANFORMERS_FAULT_POINT``), no-ops otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

__all__ = [
    "check_output",
    "clean_stale",
    "fault_point",
    "fsync_tree",
    "process_tag",
    "replace_folder",
    "staging_folder",
    "write_text_atomic",
]

_TMP, _OLD = ".tmp~", ".old~"  # markers in the hidden names: .NAME.tmp~HOST~PID~START


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL here when LEANFORMERS_FAULT_POINT names this point (fault-injection
    tests of the save path); does nothing otherwise."""
    if os.environ.get("LEANFORMERS_FAULT_POINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, /proc), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_tag() -> str:
    """``HOST~PID~START``: who wrote a hidden folder, unique even when a pid is reused."""
    host = socket.gethostname().replace("~", "-").replace("/", "-") or "host"
    return f"{host}~{os.getpid()}~{_start_time(os.getpid()) or '0'}"


def _alive(tag: str) -> bool | None:
    """Whether the process of ``tag`` still runs; None when it ran on another host (unknowable here)."""
    try:
        host, pid, start = tag.rsplit("~", 2)
    except ValueError:
        return None
    if host != process_tag().split("~")[0]:
        return None
    return _start_time(int(pid)) == start if pid.isdigit() else None


def clean_stale(output: Path) -> list[str]:
    """Tidy what interrupted runs left beside ``output``: staging folders of dead processes are removed;
    an output a dead process had moved aside (``.old~``) is moved back when ``output`` is missing, else
    removed. Returns messages about other hosts' leftovers (never touched here)."""
    messages = []
    if not output.parent.is_dir():
        return messages
    for path in output.parent.iterdir():
        for marker in (_TMP, _OLD):
            head = f".{output.name}{marker}"
            if not path.name.startswith(head):
                continue
            alive = _alive(path.name[len(head) :])
            if alive is None:
                messages.append(f"{path} was left by a run on another host; remove it with: rm -rf '{path}'")
            elif not alive:
                if marker == _OLD and not output.exists():
                    os.rename(path, output)  # the previous output, moved aside by a run that died
                else:
                    shutil.rmtree(path, ignore_errors=True)
    return messages


def check_output(output: Path, *, overwrite: bool, protected: list[Path] | tuple = ()) -> None:
    """Refuse an output folder that cannot be written safely (see the module docstring)."""
    if output.is_symlink():
        raise ValueError(
            f"the output {output} is a symlink (to {os.readlink(output)}): give the real folder or a new name"
        )
    real = output.resolve()
    for path in protected:
        source = Path(path).expanduser().resolve()
        if real == source or real in source.parents or source in real.parents:
            relation = "is" if real == source else ("holds" if real in source.parents else "lies inside")
            raise ValueError(
                f"the output {output} {relation} the source {path}: choose an output folder outside it"
            )
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"the output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output} exists and is not empty: pass overwrite=True (--overwrite) to replace it, or choose another output folder"
        )


def staging_folder(output: Path) -> Path:
    """A new hidden folder beside ``output`` to write into (after tidying dead runs' leftovers)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    for message in clean_stale(output):
        print(message)
    staging = output.parent / f".{output.name}{_TMP}{process_tag()}"
    if staging.exists():  # this very process staged here before and failed: start clean
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def fsync_tree(folder: Path) -> None:
    """fsync every file below ``folder``, then each folder, bottom up (so a rename publishes durable data)."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(
    staging: Path, output: Path, *, overwrite: bool, protected: list[Path] | tuple = ()
) -> None:
    """Publish ``staging`` as ``output``: files and folder made durable first, the output re-checked now
    (another process may have created it during the run), an old output moved aside and removed only
    after the new one is in place."""
    check_output(output, overwrite=overwrite, protected=protected)
    fsync_tree(staging)
    fault_point("before-rename")
    old = None
    if output.exists():
        old = output.parent / f".{output.name}{_OLD}{process_tag()}"
        os.rename(output, old)
        fault_point("after-old-moved-aside")
    os.rename(staging, output)
    _fsync_dir(output.parent)
    fault_point("after-rename")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file whole or not at all (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
