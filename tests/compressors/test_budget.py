"""Rank planning scans (compressors/budget.py) on tiny models."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from leanformers.compression.layout import find_layout, linear_weight
from leanformers.compression.replay import capture_block_inputs, input_of, run_block
from leanformers.compressors.allocation import outlier_ratio, owl_densities
from leanformers.compressors.budget import BudgetOptions, owl_block_densities
from tests.tiny_models import random_ids, tiny_gpt2, tiny_llama

CPU = torch.device("cpu")


def _per_group_replays(blocks, layout, hidden, calls, config) -> list[float]:
    """The OWL scan as it was before stop 32: the dense block replayed up to each group's first linear
    (``input_of``), once more to advance. The one-pass scan must give the same densities, bit for bit."""
    ratios, sizes, states = [], [], hidden
    for block in blocks:
        outliers = total = 0
        for group in layout.groups:
            first = block.get_submodule(group[0])
            sq = None
            for s, c in zip(states, calls):
                x = input_of(block, first, s, c, CPU, torch.float32)
                x = x.reshape(-1, x.shape[-1]).float()
                sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
            for name in group:
                o, t = outlier_ratio(
                    linear_weight(block.get_submodule(name)), sq.sqrt(), config.owl_threshold
                )
                outliers, total = outliers + o, total + t
        ratios.append(outliers / total)
        sizes.append(total)
        states = [run_block(block, s, c, CPU, torch.float32) for s, c in zip(states, calls)]
    return owl_densities(ratios, sizes, config.density, config.owl_lambda)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_owl_scan_runs_each_block_once_per_batch_with_the_per_group_replays_densities(build):
    model = build(layers=3).eval()
    layout, blocks = find_layout(model)
    ids = random_ids(6, 16, seed=3)
    hidden, calls = capture_block_inputs(model, blocks, [ids[:3], ids[3:]], stream_device=CPU)
    config = BudgetOptions(0.5, owl=True, owl_lambda=0.1)

    calls_per_block: Counter[int] = Counter()
    handles = [
        b.register_forward_pre_hook(lambda mod, args, i=i: calls_per_block.update([i]))
        for i, b in enumerate(blocks)
    ]
    try:
        densities = owl_block_densities(blocks, layout, hidden, calls, config, CPU)
    finally:
        for h in handles:
            h.remove()

    assert calls_per_block == {i: 2 for i in range(3)}  # one dense pass per block and batch
    assert len(set(densities)) > 1  # the blocks differ
    assert densities == _per_group_replays(blocks, layout, hidden, calls, config)


@pytest.mark.parametrize(
    "config, bar",
    [
        ({"owl": True, "owl_lambda": 0.1}, "OWL outlier scan"),
        ({"allocation": "spectrum"}, "rank allocation scan"),
    ],
    ids=["owl", "spectrum"],
)
def test_the_scans_show_a_progress_bar_only_when_compress_may(config, bar, capfd):
    from leanformers import MPIFAConfig, compress

    ids = random_ids(4, 16, seed=5)
    for progress in (True, False):
        model = tiny_llama(layers=2).eval()
        compress(model, None, MPIFAConfig(density=0.5, **config), calibration=ids, progress=progress)
        err = capfd.readouterr().err
        assert (bar in err) == progress, err[-400:]
        assert ("mpifa blocks" in err) == progress  # the block loop's bar follows the same switch
