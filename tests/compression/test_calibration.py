"""The calibration windows' content hash: recorded with every compression, and a pinned hash refused when
the windows differ (issue 19 #14a)."""

from __future__ import annotations

import pytest
import torch

from leanformers import MPIFAConfig, WandaConfig, compress
from leanformers.compression.calibration import windows_sha256
from tests.tiny_models import random_ids, tiny_llama


def test_the_windows_hash_is_recorded_and_depends_only_on_the_ids():
    ids = random_ids(4, 16, seed=1)
    model = tiny_llama()
    report = compress(model, None, MPIFAConfig(nsamples=4, seqlen=16), ids, progress=False)
    assert report.calibration_sha256 == windows_sha256(ids) == windows_sha256(ids.clone().int())
    assert model.config.quantization_config.extra["calibration_sha256"] == report.calibration_sha256
    assert windows_sha256(ids) != windows_sha256(random_ids(4, 16, seed=2))
    assert windows_sha256(ids) != windows_sha256(ids.reshape(8, 8))  # same ids, other windows


def test_a_pinned_hash_that_differs_stops_before_any_weight_changes():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not the pinned calibration_sha256"):
        compress(
            model,
            None,
            WandaConfig(nsamples=4, seqlen=16, calibration_sha256="ab" * 32),
            random_ids(4, 16),
            progress=False,
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    pinned = windows_sha256(random_ids(4, 16))
    compress(
        model,
        None,
        WandaConfig(nsamples=4, seqlen=16, calibration_sha256=pinned),
        random_ids(4, 16),
        progress=False,
    )
    with pytest.raises(ValueError, match="calibration_sha256 must be a sha256 hex digest"):
        MPIFAConfig(calibration_sha256="abc")
