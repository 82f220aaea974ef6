"""Output folders: nothing lost, nothing half-written (issue 19 #5, #6, #7). Each test failed on ae1fe58:
--overwrite deleted a source inside the output, streaming replaced a folder created during the run, staging
folders were never tidied and nothing was fsynced."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from leanformers import MPIFAConfig, compress, save_compressed
from leanformers.folders import (
    check_output,
    clean_stale,
    process_tag,
    replace_folder,
    staging_folder,
    write_text_atomic,
)
from tests.tiny_models import random_ids, tiny_llama


def _compressed():
    model = tiny_llama()
    compress(model, None, MPIFAConfig(nsamples=4, seqlen=16), random_ids(4, 16), progress=False)
    return model


def test_an_output_that_is_holds_or_lies_inside_the_source_is_refused(tmp_path):
    source = tmp_path / "models" / "llama"
    source.mkdir(parents=True)
    (source / "model.safetensors").write_text("precious")
    (tmp_path / "models" / "sibling").mkdir()
    for output, relation in ((tmp_path / "models", "holds"), (source, "is"), (source / "out", "lies inside")):
        with pytest.raises(ValueError, match=f"{relation} the source"):
            check_output(output, overwrite=True, protected=[source])
    assert (source / "model.safetensors").read_text() == "precious" and (
        tmp_path / "models" / "sibling"
    ).is_dir()
    # save_compressed protects the folder the model was loaded from
    model = _compressed()
    model.config._name_or_path = str(source)
    with pytest.raises(ValueError, match="holds the source"):
        save_compressed(model, None, tmp_path / "models", overwrite=True)
    assert (source / "model.safetensors").read_text() == "precious"


def test_a_symlinked_output_is_refused_naming_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(ValueError, match=f"is a symlink \\(to {tmp_path / 'real'}\\)"):
        save_compressed(_compressed(), None, tmp_path / "link", overwrite=True)


def test_overwrite_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    save_compressed(_compressed(), None, out)
    save_compressed(_compressed(), None, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_output_is_checked_again_at_the_final_rename(tmp_path):
    """A folder that appears during a long run (another job) is not replaced without overwrite."""
    out = tmp_path / "out"
    staging = staging_folder(out)
    (staging / "config.json").write_text("{}")
    out.mkdir()
    (out / "theirs.txt").write_text("another job's result")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        replace_folder(staging, out, overwrite=False)
    assert (out / "theirs.txt").read_text() == "another job's result"


def test_the_streaming_mode_rechecks_at_the_rename_too(tmp_path):
    from leanformers import compress_pretrained

    tiny_llama().save_pretrained(tmp_path / "dense")
    out = tmp_path / "out"

    def card(report):  # runs after every block was written, just before the folder is published
        out.mkdir()
        (out / "theirs.txt").write_text("another job's result")
        return "card"

    with pytest.raises(FileExistsError, match="exists and is not empty"):
        compress_pretrained(
            tmp_path / "dense",
            out,
            MPIFAConfig(nsamples=4, seqlen=16),
            random_ids(4, 16),
            model_card=card,
            progress=False,
        )
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "out"]  # no staging folder left


def test_files_then_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    import leanformers.folders as folders

    calls = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(
        folders.os,
        "fsync",
        lambda fd: (calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1],
    )
    monkeypatch.setattr(
        folders.os, "rename", lambda a, b: (calls.append(("rename", str(b))), real_rename(a, b))[1]
    )
    out = tmp_path / "out"
    staging = staging_folder(out)
    (staging / "a.safetensors").write_text("x")
    (staging / "config.json").write_text("{}")
    replace_folder(staging, out, overwrite=False)
    names = [(kind, os.path.basename(path)) for kind, path in calls]
    rename = names.index(("rename", "out"))
    assert {("fsync", "a.safetensors"), ("fsync", "config.json"), ("fsync", staging.name)} <= set(
        names[:rename]
    )
    assert names.index(("fsync", staging.name)) > max(
        names.index(("fsync", "a.safetensors")), names.index(("fsync", "config.json"))
    )
    assert names[rename + 1 :] == [("fsync", tmp_path.name)]  # then the parent, which now holds the new name


def test_leftovers_of_dead_runs_are_tidied_and_other_hosts_named(tmp_path):
    out = tmp_path / "out"
    host = socket.gethostname()
    dead = tmp_path / f".out.tmp~{host}~999999~1"
    dead.mkdir()
    mine = tmp_path / f".out.tmp~{process_tag()}"  # a live process (this one): not touched by others
    mine.mkdir()
    other = tmp_path / ".out.tmp~another-host~123~456"
    other.mkdir()
    moved_aside = tmp_path / f".out.old~{host}~999998~1"  # a run died after moving the output aside
    moved_aside.mkdir()
    (moved_aside / "config.json").write_text("previous output")
    messages = clean_stale(out)
    assert not dead.exists() and mine.exists() and other.exists()
    assert (out / "config.json").read_text() == "previous output" and not moved_aside.exists()
    assert messages == [f"{other} was left by a run on another host; remove it with: rm -rf '{other}'"]


def test_reports_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import leanformers.folders as folders

    report = tmp_path / "report.json"
    write_text_atomic(report, '{"old": true}')

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(folders.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(report, '{"new": true}')
    assert report.read_text() == '{"old": true}' and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_shard_index_names_are_confined_to_the_folder(tmp_path):
    import json

    from leanformers.compression.checkpoint_io import CheckpointReader

    (tmp_path / "config.json").write_text("{}")
    for bad in ("../secret.safetensors", "/etc/passwd", "sub/model.safetensors"):
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": bad}}))
        with pytest.raises(ValueError, match="is not a plain file name in the checkpoint folder"):
            CheckpointReader(tmp_path)


def test_cards_and_provenance(tmp_path):
    """#9: no local absolute path in the card; #10: the source revision, calibration hash and versions."""
    from leanformers.hub import model_card, source_revision, visibility_problem

    model = tiny_llama()
    model.save_pretrained(tmp_path / "my-llama")
    model.config._name_or_path = str(tmp_path / "my-llama")
    revision = source_revision(model)
    assert revision["source"] == "my-llama" and set(revision["sha256"]) == {"model.safetensors"}
    card = model_card(
        base_model=str(tmp_path / "my-llama"), method="mpifa", summary={}, settings={}, provenance=revision
    )
    assert str(tmp_path) not in card and "my-llama" in card and "base_model:" not in card
    assert "base_model: org/name" in model_card(
        base_model="org/name", method="mpifa", summary={}, settings={}
    )
    ids = random_ids(4, 16)
    report = compress(model, None, MPIFAConfig(nsamples=4, seqlen=16), ids, progress=False)
    assert report.provenance["sha256"] == revision["sha256"] and report.provenance["calibration_sha256"]
    assert set(report.provenance["versions"]) == {"leanformers", "torch", "transformers"}
    assert model.config.quantization_config.extra["provenance"] == report.provenance
    assert "is PUBLIC" in visibility_problem("org/x", exists_private=False, want_private=True)
    assert (
        visibility_problem("org/x", None, True) is None and visibility_problem("org/x", False, False) is None
    )
    with pytest.raises(ValueError, match="--revision pins a Hub id"):
        from leanformers.hub import load_causal_lm

        load_causal_lm(tmp_path / "my-llama", revision="main")
    assert torch.isfinite(model(input_ids=ids[:1]).logits).all()
