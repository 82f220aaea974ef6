"""The two activation streams of the sequential pipeline, and the one place where a numerical error
learns which block it happened in.

For each calibration batch the pipeline carries the hidden states entering the current block twice:
in the dense model (the target ``W X_d``) and in the model compressed so far (``X_c``, what the
compressed layers will actually see). ``BlockStreams`` owns both lists and moves them through a block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from leanformers.pifa.calibration import (
    BlockCall,
    capture_block_inputs,
    group_input_stats,
    run_block,
    run_block_capturing,
)
from leanformers.pifa.config import MPIFAConfig
from leanformers.pifa.reconstruct import GramStats
from leanformers.pifa.replay import ReplayMemo

__all__ = ["BlockStreams", "block_errors"]

_FIX = "load the model in float32 (--dtype float32) or check the calibration text"
DENSE_ERROR = "non-finite activations in the dense model ({exc}); " + _FIX
STATS_ERROR = (
    "{exc}. The model produces inf/NaN on the calibration data; load it in float32 (--dtype float32) "
    "or check the calibration text"
)
AFTER_ERROR = "non-finite activations after the block ({exc}); " + _FIX


@contextlib.contextmanager
def block_errors(index: int, message: str):
    """Re-raise a FloatingPointError raised inside as ``block {index}: {message}``, where ``message``
    embeds the original error as ``{exc}`` and names the fix."""
    try:
        yield
    except FloatingPointError as exc:
        raise FloatingPointError(f"block {index}: " + message.format(exc=exc)) from exc


def check_first_inputs_finite(hidden: list[torch.Tensor]) -> None:
    """Refuse non-finite inputs of the first block (the embeddings' output) before any fitting."""
    if not all(torch.isfinite(h).all() for h in hidden):
        raise FloatingPointError(
            "block 0: non-finite activations at the input of the first block (embeddings); load the model "
            "in float32 (--dtype float32) or check the checkpoint"
        )


def stream_options(config: MPIFAConfig) -> dict[str, bool]:
    """Which statistics the streams gather for ``config``: K = X_d X_c^T enters only the U/V steps, the
    dense inputs only the whitening init."""
    return {"need_cross": config.alpha > 0 and config.steps > 0, "need_dense": config.init == "whiten"}


class BlockStreams:
    """Dense and compressed inputs of the current block, one (batch, seq, hidden) tensor per batch.

    ``active=False`` (plain SVD: no statistics needed) keeps both streams empty and every method a
    no-op, so the pipeline runs no forward pass at all.

    The compressed-stream replays of a block (one per group, one to advance) share a ``ReplayMemo``:
    finished sub-modules (e.g. the attention once q/k/v/o are compressed) are not recomputed on
    bitwise-equal inputs. ``reuse_outputs = False`` replays everything (the reference the tests compare
    against); ``reused`` counts the sub-module calls served from the memo. The memo holds up to ~8
    hidden-size activations per calibration token on the compute device until the block is done, so it
    is off for offloaded streams (``offload`` cpu/disk, pifa/offload.py), whose point is to keep
    activations off the compute device.
    """

    reuse_outputs: bool = True

    def __init__(
        self,
        hidden: list[torch.Tensor],
        calls: list[BlockCall],
        device: torch.device,
        active: bool,
        *,
        need_cross: bool = False,
        need_dense: bool = False,
        reuse: bool = True,
    ) -> None:
        self.need_cross, self.need_dense = need_cross, need_dense  # which Gram products to accumulate
        self.dense = hidden
        self.compressed = list(hidden)
        self.calls = calls
        self.device = device
        self.active = active
        self._next_dense: list[torch.Tensor] = []
        self._dense_inputs: dict[str, list[torch.Tensor]] = {}
        self._memo = ReplayMemo() if reuse and self.reuse_outputs else None
        self.reused = 0

    @classmethod
    def capture(
        cls,
        model: nn.Module,
        blocks: nn.ModuleList,
        batches: Iterable[torch.Tensor],
        device: torch.device,
        config: MPIFAConfig,
        active: bool,
    ) -> BlockStreams:
        """Inputs of the first block for every batch of token ids, on the CPU with
        ``config.offload_streams`` else on ``device``; which statistics to gather follows ``config``."""
        stream_device = torch.device("cpu") if config.offload_streams else device
        hidden, calls = (
            capture_block_inputs(model, blocks, list(batches), stream_device=stream_device)
            if active
            else ([], [])
        )
        check_first_inputs_finite(hidden)
        return cls(hidden, calls, device, active, **stream_options(config), reuse=config.offload == "none")

    def run_dense(self, block: nn.Module, index: int, first_modules: list[str]) -> None:
        """One pass of the still untouched ``block`` on the dense stream: keeps its outputs (the next
        block's dense inputs) and the dense inputs of ``first_modules`` (each group's first linear)."""
        if not self.active:
            return
        with block_errors(index, DENSE_ERROR):
            self._next_dense, self._dense_inputs = run_block_capturing(
                block, self.dense, self.calls, first_modules, self.device, torch.float32
            )

    def group_stats(self, block: nn.Module, index: int, first_module: str) -> GramStats | None:
        """Gram statistics of the input of ``first_module`` (dense inputs from ``run_dense``, compressed
        inputs by running the partly compressed ``block``); None when the streams are inactive."""
        if not self.active:
            return None
        with block_errors(index, STATS_ERROR):
            return group_input_stats(
                self._dense_inputs.pop(first_module),
                block,
                first_module,
                self.compressed,
                self.calls,
                device=self.device,
                dtype=torch.float32,
                need_cross=self.need_cross,
                need_dense=self.need_dense,
                memo=self._memo,
            )

    def advance(self, block: nn.Module, index: int) -> None:
        """Move both streams past ``block`` (now compressed): the dense stream takes the outputs of the
        dense pass, the compressed stream runs the compressed block."""
        self.dense, self._next_dense = self._next_dense, []
        if not self.active:
            self.compressed = []
            return
        with block_errors(index, AFTER_ERROR):
            compressed = []
            for j, (s, c) in enumerate(zip(self.compressed, self.calls)):
                with self._memo.replay(block, j) if self._memo is not None else contextlib.nullcontext():
                    compressed.append(run_block(block, s, c, self.device, torch.float32))
            self.compressed = compressed
        if self._memo is not None:  # the next block starts afresh: free the recorded tensors
            self.reused += self._memo.hits
            self._memo.hits = 0
            self._memo.clear()
