"""The content-addressed cache of self-calibration windows: keys, atomic writes, and reads that serve only
windows whose recorded hash checks."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from leanformers.compression.self_calibration_cache import (
    cache_path,
    model_sha256,
    read_windows,
    windows_key,
    write_windows,
)
from tests.tiny_models import tiny_llama


def test_key_is_the_sha256_of_the_material_whatever_its_order():
    a = windows_key({"seed": 0, "nsamples": 2, "settings": {"top_p": 0.95, "segments": 1}})
    b = windows_key({"settings": {"segments": 1, "top_p": 0.95}, "nsamples": 2, "seed": 0})
    assert a == b and len(a) == 64
    assert windows_key({"seed": 1, "nsamples": 2, "settings": {"top_p": 0.95, "segments": 1}}) != a


def test_written_windows_read_back_and_nothing_else_is_served(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANFORMERS_CACHE", str(tmp_path / "cache"))
    path = cache_path("k" * 64)
    assert path.parent == tmp_path / "cache" / "self-calibration"
    windows = torch.randint(0, 1000, (3, 16))
    write_windows(path, windows, {"seed": 0})
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    assert torch.equal(read_windows(path, 3, 16), windows)
    assert read_windows(path, 3, 17) is None and read_windows(path, 2, 16) is None  # another shape
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tampered = load_file(str(path))["windows"].clone()
    tampered[0, 0] += 1
    save_file({"windows": tampered}, str(path), metadata=metadata)  # the recorded hash, other ids
    assert read_windows(path, 3, 16) is None
    path.write_bytes(b"a partial copy")
    assert read_windows(path, 3, 16) is None


def test_model_hash_follows_every_weight_and_not_the_object():
    model = tiny_llama()
    before = model_sha256(model)
    assert model_sha256(model) == before
    twin = type(model)(model.config)
    twin.load_state_dict(model.state_dict())
    assert model_sha256(twin) == before
    with torch.no_grad():
        next(twin.parameters()).view(-1)[0] += 1e-3
    assert model_sha256(twin) != before
