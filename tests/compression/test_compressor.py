"""The Compressor protocol and its registry: a compressor defined here, outside src/, runs through the
same pipeline, command line and save path as the built-in ones, without touching the package."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import leanformers
from leanformers.compression import (
    COMPRESSORS,
    CompressionConfig,
    Compressor,
    StreamNeeds,
    compress,
    compressor_for,
    get_compressor,
    register_compressor,
)
from leanformers.compression.layout import linear_weight
from leanformers.compression.report import ModuleReport, module_path
from leanformers.storage.sparsity import SPARSITY_KEY, sparsity_record
from tests.tiny_models import random_ids, tiny_llama


@dataclass
class HalvesConfig(CompressionConfig):
    """Zero the inputs whose mean |x| is below the median (a toy 'pruner').

    Attributes:
        keep: the share of input channels each linear keeps, in (0, 1].
    """

    keep: float = 0.5


class HalvesCompressor(Compressor):
    name = "toy-halves"
    config_class = HalvesConfig

    def stream_needs(self) -> StreamNeeds:
        return StreamNeeds(dense=True)

    def group_statistics(self, group, inputs):
        total = None
        for xd, _ in inputs:
            part = xd.reshape(-1, xd.shape[-1]).abs().sum(0)
            total = part if total is None else total + part
        return total

    def compress_group(self, block, index, group, stats):
        keep = stats.argsort(descending=True)[: int(len(stats) * self.config.keep)]
        mask = torch.zeros_like(stats, dtype=torch.bool)
        mask[keep] = True
        reports = []
        for name in group:
            W = linear_weight(block.get_submodule(name))
            with torch.no_grad():
                W.mul_(mask.to(W.dtype)[None, :])
            reports.append(
                ModuleReport(
                    module_path(self.prefix, index, name),
                    *W.shape,
                    0,
                    "toy",
                    W.numel(),
                    int(W.count_nonzero()),
                    0.5,
                    0.0,
                )
            )
        self.names = getattr(self, "names", []) + [r.name for r in reports]
        return reports

    def finalize(self, model, specs, report):
        record = sparsity_record(self.name, "1:2", self.names)
        record["format"] = "channel-pruned"  # its own format: save_compressed checks only N:M records
        setattr(model.config, SPARSITY_KEY, record)


@pytest.fixture
def toy():
    register_compressor(HalvesCompressor)
    yield HalvesCompressor
    COMPRESSORS.pop(HalvesCompressor.name)


def test_a_compressor_registered_from_outside_runs_through_the_pipeline(toy):
    assert "toy-halves" in leanformers.available_compressors() and get_compressor("toy-halves") is toy
    assert HalvesConfig.method == "toy-halves" and isinstance(compressor_for(HalvesConfig()), toy)
    model = tiny_llama()
    report = compress(
        model, None, HalvesConfig(nsamples=4, seqlen=16), calibration=random_ids(4, 16), progress=False
    )
    assert report.method == "toy-halves" and len(report.modules) == 2 * 7
    assert 0.45 <= report.achieved_density <= 0.55
    W = model.model.layers[1].mlp.down_proj.weight
    assert int((W.abs().sum(0) == 0).sum()) == W.shape[1] // 2  # whole input channels are zero


def test_the_command_line_takes_a_registered_compressor_and_its_flags(
    toy, tiny_lm_folder, shared_data, tmp_path, capsys
):
    from leanformers.compression.cli import main
    from leanformers.compression.options import build_parser
    from tests.helpers import mpifa_cli_args

    assert "--keep" in build_parser().format_help()
    out = tmp_path / "o"
    assert (
        main(mpifa_cli_args(tiny_lm_folder, out, shared_data, "--method", "toy-halves", "--keep", "0.25"))
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["sparsity"]["method"] == "toy-halves" and len(config["sparsity"]["modules"]) == 14
    assert "achieved density (targeted)  0.25" in capsys.readouterr().out
    args = mpifa_cli_args(tiny_lm_folder, tmp_path / "o2", shared_data, "--method", "mpifa", "--keep", "0.25")
    assert main(args) == 1
    assert "--keep does not apply to --method mpifa; it is an option of toy-halves" in capsys.readouterr().err


def test_registration_refuses_what_is_not_a_compressor_or_a_taken_name():
    with pytest.raises(TypeError, match="Compressor subclass"):
        register_compressor(HalvesConfig)

    class Clash(HalvesCompressor):
        name = "mpifa"

    with pytest.raises(ValueError, match="compressor name 'mpifa' is already taken"):
        register_compressor(Clash)
    with pytest.raises(ValueError, match="unknown compression method 'nope': choose one of"):
        get_compressor("nope")
    with pytest.raises(TypeError, match="no registered compressor takes a CompressionConfig"):
        compressor_for(CompressionConfig())
    assert json.dumps(leanformers.available_compressors())
