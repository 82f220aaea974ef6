"""Folders derived from a file are cached by the file's content (issue 19 #1: a GGUF cache keyed by the
file name served the old model for a changed or another file of the same name)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from leanformers.filecache import SOURCE_RECORD, cached_conversion, file_sha256
from leanformers.hub import load_causal_lm
from tests.helpers import REPO_ROOT, fresh_env


def _build(source, staging):
    (staging / "config.json").write_text("{}")
    (staging / "payload").write_bytes(source.read_bytes())


def test_another_file_of_the_same_name_or_a_changed_file_is_converted_anew(tmp_path):
    cache = tmp_path / "cache"
    a, b = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for path, body in ((a, b"first model"), (b, b"second model")):
        path.parent.mkdir()
        path.write_bytes(body)
    fa, fb = cached_conversion(a, cache, "gguf", _build), cached_conversion(b, cache, "gguf", _build)
    assert (
        fa != fb
        and (fa / "payload").read_bytes() == b"first model"
        and (fb / "payload").read_bytes() == b"second model"
    )
    assert json.loads((fa / SOURCE_RECORD).read_text())["sha256"] == file_sha256(a)
    a.write_bytes(b"first model, retrained")
    fa2 = cached_conversion(a, cache, "gguf", _build)
    assert fa2 != fa and (fa2 / "payload").read_bytes() == b"first model, retrained"


def test_a_folder_whose_record_differs_is_never_served(tmp_path):
    cache, src = tmp_path / "cache", tmp_path / "m.gguf"
    src.write_bytes(b"weights")
    folder = cached_conversion(src, cache, "gguf", _build)
    (folder / "payload").write_bytes(b"tampered")
    record = json.loads((folder / SOURCE_RECORD).read_text())
    (folder / SOURCE_RECORD).write_text(json.dumps({**record, "sha256": "0" * 64}))
    again = cached_conversion(src, cache, "gguf", _build)
    assert again == folder and (again / "payload").read_bytes() == b"weights"


def test_an_unchanged_file_is_hashed_once(tmp_path):
    cache, src = tmp_path / "cache", tmp_path / "m.gguf"
    src.write_bytes(b"AAAA")
    first = file_sha256(src, cache)
    stat = src.stat()
    with open(src, "r+b") as f:  # same size, inode and (restored) mtime: the memo answers without reading
        f.write(b"BBBB")
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(src, cache) == first != file_sha256(src)  # no memo: the bytes are read


def test_a_missing_file_is_an_error_not_a_cached_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(tmp_path / "nowhere" / "model.gguf")


@pytest.mark.slow
def test_two_processes_converting_the_same_file_both_succeed(tmp_path):
    cache, src = tmp_path / "cache", tmp_path / "m.gguf"
    src.write_bytes(b"weights")
    script = textwrap.dedent(f"""
        import time, sys
        from pathlib import Path
        from leanformers.filecache import cached_conversion
        def build(source, staging):
            time.sleep(1.5)  # both processes are converting at the same time
            (staging / "config.json").write_text("{{}}")
            (staging / "payload").write_bytes(source.read_bytes())
        print(cached_conversion(Path({str(src)!r}), Path({str(cache)!r}), "gguf", build))
    """)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=REPO_ROOT,
            env=fresh_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    folders = {o[0].strip() for o in outs}
    assert len(folders) == 1
    leftovers = [p.name for p in (cache / "gguf").iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
