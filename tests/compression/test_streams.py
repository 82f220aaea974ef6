"""The compressed-stream replays reuse finished sub-modules' outputs without changing any result."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import leanformers.compression.offload as offload_module
from leanformers.compression.memo import ReplayMemo
from leanformers.compression.streams import BlockStreams
from leanformers.compressors.mpifa import MPIFAConfig, mpifa_compress
from leanformers.storage.layers import PIFALinear
from tests.compression.tiny_decoders import tiny_gemma3
from tests.tiny_models import random_ids, tiny_gpt2, tiny_llama


def _compress(model, monkeypatch, reuse: bool, **overrides) -> tuple[dict, int]:
    made: list[BlockStreams] = []
    # make_streams (pifa/offload.py) picks BlockStreams, or OffloadedStreams when offload is cpu/disk
    name = "BlockStreams" if overrides.get("offload", "none") == "none" else "OffloadedStreams"

    class Recording(getattr(offload_module, name)):
        reuse_outputs = reuse

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(offload_module, name, Recording)
    config = MPIFAConfig(density=0.5, nsamples=8, seqlen=32, batch_size=4, device="cpu", **overrides)
    mpifa_compress(model, None, config, calibration=random_ids(8, 32, seed=1), progress=False)
    return model.state_dict(), made[0].reused


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_gemma3], ids=["llama", "gpt2", "gemma3"])
def test_reusing_finished_submodules_gives_bitwise_identical_weights(build, monkeypatch):
    """Fast path (memo) vs the straightforward pipeline that replays every sub-module every time."""
    dense = build()
    reference, reused_ref = _compress(copy.deepcopy(dense), monkeypatch, reuse=False)
    fast, reused = _compress(copy.deepcopy(dense), monkeypatch, reuse=True)
    assert reused_ref == 0
    # Per block and batch at least the attention (finished after o_proj) is served twice from the memo.
    assert reused >= 2 * 2 * 2
    assert reference.keys() == fast.keys()
    for name in reference:
        assert torch.equal(reference[name], fast[name]), name


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_every_compressed_linear_runs_once_per_batch(build, monkeypatch):
    """The compressed stream replays a block once per group and once more to advance; with the memo each
    compressed linear still runs once per calibration batch, the MLP's first linears included (their
    scatter-free reorder comes after the advance, so it does not void their recorded outputs)."""
    calls: dict[int, int] = {}
    forward = PIFALinear.forward

    def counting(self, x):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return forward(self, x)

    monkeypatch.setattr(PIFALinear, "forward", counting)
    model = build()
    config = MPIFAConfig(density=0.5, nsamples=8, seqlen=32, batch_size=4, device="cpu")
    mpifa_compress(model, None, config, calibration=random_ids(8, 32, seed=1), progress=False)
    layers = [m for m in model.modules() if isinstance(m, PIFALinear)]
    assert len(layers) > 4 and any(m.input_permuted for m in layers)  # the scatter-free reorder ran
    assert all(calls.get(id(m)) == 2 for m in layers), sorted(calls.values())  # 2 batches of 4 windows


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_no_memo_with_offloaded_streams(offload, monkeypatch):
    """Offloaded streams keep activations off the compute device: the memo (which holds some there) is off."""
    _, reused = _compress(tiny_llama(), monkeypatch, reuse=True, offload=offload)
    assert reused == 0


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = PIFALinear.from_linear(nn.Linear(8, 8), 4)
        self.log: list[int] = []  # not a plain attribute: plain ones are part of the memo's state check

    @property
    def calls(self) -> int:
        return len(self.log)

    def forward(self, x, scale=None):
        self.log.append(1)
        return self.proj(x) * (1.0 if scale is None else scale)


class _Block(nn.Module):
    def __init__(self, mutate: bool):
        super().__init__()
        self.inner = _Inner()
        self.mutate = mutate

    def forward(self, x, scale=None):
        y = self.inner(x, scale=scale)
        if self.mutate:
            y.mul_(2.0)  # a consumer that edits the (possibly memoised) output in place
        return y


@torch.no_grad()
def test_memo_reuses_only_valid_entries():
    block, memo = _Block(mutate=False), ReplayMemo()
    x = torch.randn(3, 8)
    with memo.replay(block, 0):
        first = block(x)
    with memo.replay(block, 0):
        assert torch.equal(block(x.clone()), first)  # equal input, same module: reused
    assert block.inner.calls == 1 and memo.hits == 1
    with memo.replay(block, 0):
        block(x + 1e-6)  # changed input
        block(x, scale=2.0)  # changed keyword input
    with memo.replay(block, 1):
        block(x)  # another calibration batch
    assert block.inner.calls == 4
    with torch.no_grad():
        block.inner.proj.coeff.add_(0.0)  # in-place edit of a parameter bumps its version
    with memo.replay(block, 1):
        block(x)
    assert block.inner.calls == 5
    block.inner.proj = PIFALinear.from_linear(nn.Linear(8, 8), 4)  # replaced sub-module
    with memo.replay(block, 1):
        block(x)
    assert block.inner.calls == 6
    with memo.replay(block, 1):
        block(x)
    block.inner.proj.input_permuted = True  # a plain attribute that changes the function
    with memo.replay(block, 1):
        block(x)
    assert block.inner.calls == 7
    assert "forward" not in block.inner.__dict__  # patch removed after each replay


@torch.no_grad()
def test_memo_output_edited_in_place_is_recomputed():
    block, memo = _Block(mutate=True), ReplayMemo()
    x = torch.randn(3, 8)
    expected = block(x)
    for _ in range(3):
        with memo.replay(block, 0):
            assert torch.equal(block(x), expected)
    assert memo.hits == 0


@torch.no_grad()
def test_memo_skips_modules_with_dense_linears():
    block = nn.Sequential(nn.Linear(8, 8), PIFALinear.from_linear(nn.Linear(8, 8), 4))
    assert ReplayMemo._finished(block) == [block[1]]
