"""Old import paths keep working after the compression core was split out of ``leanformers.pifa`` (issue 18):
each is a shim that warns once (FutureWarning) and hands out the same objects as the new home."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

SHIMS = {
    "leanformers.pifa.quantizer": ("save_compressed", "leanformers.storage.saving"),
    "leanformers.pifa.layer": ("PIFALinear", "leanformers.storage.pifa_linear"),
    "leanformers.pifa.compress": ("mpifa_compress", "leanformers.compressors.mpifa"),
    "leanformers.pifa.config": ("MPIFAConfig", "leanformers.compressors.mpifa"),
    "leanformers.pifa.streaming": ("mpifa_compress_pretrained", "leanformers.compressors.mpifa"),
    "leanformers.pifa.calibration": ("find_layout", "leanformers.compression.layout"),
    "leanformers.pifa.reconstruct": ("reconstruct", "leanformers.compressors.reconstruct"),
    "leanformers.pifa.cli": ("main", "leanformers.compression.cli"),
}


@pytest.mark.parametrize("old", sorted(SHIMS))
def test_old_paths_warn_and_give_the_new_objects(old):
    name, new = SHIMS[old]
    for module in [m for m in sys.modules if m == "leanformers.pifa" or m.startswith("leanformers.pifa.")]:
        del sys.modules[module]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shim = importlib.import_module(old)
    assert getattr(shim, name) is getattr(importlib.import_module(new), name)
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert any(old in m and "deprecated" in m for m in messages), messages


def test_importing_leanformers_itself_warns_about_nothing():
    from tests.helpers import run_python

    proc = run_python("import warnings; warnings.simplefilter('error', FutureWarning); import leanformers")
    assert proc.returncode == 0, proc.stderr[-2000:]
