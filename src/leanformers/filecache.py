"""Folders derived from a file (a GGUF dequantised to safetensors), cached by the file's CONTENT.

A cache keyed by a file's name serves the old conversion when the file changes, or when another file of
the same name is given: ``cached_conversion`` keys by the sha256 of the bytes (memoised per path, size,
mtime_ns and inode, so an unchanged file is hashed once), records the key inside the folder, and never
serves a folder whose record differs. ``publish`` builds into a private staging folder and renames it into
place; when two processes convert the same file at once both succeed (the second keeps the first's folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["SOURCE_RECORD", "cached_conversion", "file_sha256", "publish"]

SOURCE_RECORD = "leanformers-source.json"  # inside a derived folder: what it was made from


def _memo_path(cache: Path) -> Path:
    return cache / "file-sha256.json"


def file_sha256(path: str | os.PathLike, cache: Path | None = None) -> str:
    """sha256 of the file's bytes; remembered in ``cache``/file-sha256.json by (path, size, mtime_ns, inode)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (or is not a file)")
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    memo: dict = {}
    if cache is not None and _memo_path(cache).is_file():
        try:
            memo = json.loads(_memo_path(cache).read_text())
        except (OSError, json.JSONDecodeError):
            memo = {}
        hit = memo.get(str(path))
        if hit and hit.get("stamp") == stamp:
            return hit["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    sha = digest.hexdigest()
    if cache is not None:
        memo[str(path)] = {"stamp": stamp, "sha256": sha}
        cache.mkdir(parents=True, exist_ok=True)
        tmp = _memo_path(cache).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=1))
        os.replace(tmp, _memo_path(cache))
    return sha


def _matches(folder: Path, record: dict) -> bool:
    try:
        return (
            json.loads((folder / SOURCE_RECORD).read_text()) == record and (folder / "config.json").is_file()
        )
    except (OSError, json.JSONDecodeError):
        return False


def publish(target: Path, record: dict, build: Callable[[Path], None]) -> Path:
    """``build(staging)`` then rename the staging folder to ``target`` with ``record`` inside. A ``target``
    another process published meanwhile with the same record is kept (ours is dropped); one with another
    record (stale, tampered) is replaced."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        build(staging)
        (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
        for _ in range(3):
            try:
                os.rename(staging, target)  # atomic; fails when target exists (non-empty)
                return target
            except OSError:
                if _matches(target, record):
                    shutil.rmtree(staging, ignore_errors=True)
                    return target
                aside = target.parent / f".{target.name}.stale-{os.getpid()}"
                try:
                    os.rename(target, aside)
                except OSError:
                    continue  # someone else moved it: try again
                shutil.rmtree(aside, ignore_errors=True)
        raise RuntimeError(f"could not publish {target}: other processes keep replacing it")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def cached_conversion(
    source: str | os.PathLike, cache: Path, kind: str, build: Callable[[Path, Path], None]
) -> Path:
    """The folder ``build(source, staging)`` makes from the file ``source``, cached under ``cache``/``kind``
    by the file's sha256 (converted once per content, never a mismatch served)."""
    source = Path(source).expanduser()
    sha = file_sha256(source, cache)
    record = {"sha256": sha, "file": source.name, "kind": kind}
    target = cache / kind / f"{source.stem}-{sha[:16]}"
    if _matches(target, record):
        return target
    return publish(target, record, lambda staging: build(source, staging))
