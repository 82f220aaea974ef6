"""The activation streams of the block pipeline, and the one place where a numerical error learns which
block it happened in.

For each calibration batch the pipeline carries the hidden states entering the current block up to
twice: in the dense model (``X_d``, e.g. the target ``W X_d`` of MPIFA) and in the model compressed so far
(``X_c``, what the compressed layers will actually see). A compressor says which it needs
(``StreamNeeds``); ``BlockStreams`` owns those lists, hands each group of linears its inputs, and moves
the streams through a block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leanformers.compression.memo import ReplayMemo
from leanformers.compression.replay import (
    BlockCall,
    capture_block_inputs,
    input_of,
    run_block,
    run_block_capturing,
)

__all__ = [
    "AFTER_ERROR",
    "DENSE_ERROR",
    "STATS_ERROR",
    "BlockStreams",
    "StreamNeeds",
    "block_errors",
    "check_first_inputs_finite",
]

_FIX = "load the model in float32 (--dtype float32) or check the calibration text"
DENSE_ERROR = "non-finite activations in the dense model ({exc}); " + _FIX
STATS_ERROR = (
    "{exc}. The model produces inf/NaN on the calibration data; load it in float32 (--dtype float32) "
    "or check the calibration text"
)
AFTER_ERROR = "non-finite activations after the block ({exc}); " + _FIX

Pair = tuple[torch.Tensor | None, torch.Tensor | None]


@dataclass(frozen=True)
class StreamNeeds:
    """Which calibration activations a compressor's statistics read.

    dense: each group's inputs in the dense model (X_d).
    compressed: each group's inputs in the model compressed so far (X_c).
    sequential: with ``compressed``, X_c of a group is taken after the earlier groups of its block are
        compressed (MPIFA); False takes every group's X_c from one pass of the block as it entered
        (Wanda / SparseGPT: the earlier blocks pruned, this one not yet).
    """

    dense: bool = False
    compressed: bool = False
    sequential: bool = True

    @property
    def any(self) -> bool:
        """Whether any calibration forward is needed at all."""
        return self.dense or self.compressed


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


class BlockStreams:
    """The dense and/or compressed inputs of the current block, one (batch, seq, hidden) tensor per batch.

    ``needs`` with neither stream (plain SVD: no statistics) keeps both streams empty and every method a
    no-op, so the pipeline runs no forward pass at all.

    In sequential mode the compressed-stream replays of a block (one per group, one to advance) share a
    ``ReplayMemo``: finished sub-modules (e.g. the attention once q/k/v/o are compressed) are not
    recomputed on bitwise-equal inputs. ``reuse_outputs = False`` replays everything (the reference the
    tests compare against); ``reused`` counts the sub-module calls served from the memo. The memo holds
    up to ~8 hidden-size activations per calibration token on the compute device until the block is done,
    so it is off for offloaded streams (``offload`` cpu/disk, compression/offload.py), whose point is to
    keep activations off the compute device.
    """

    reuse_outputs: bool = True

    def __init__(
        self,
        hidden: list[torch.Tensor],
        calls: list[BlockCall],
        device: torch.device,
        needs: StreamNeeds,
        *,
        reuse: bool = True,
    ) -> None:
        self.needs = needs
        self.active = needs.any
        self.dense = hidden
        self.compressed = list(hidden)
        self.calls = calls
        self.device = device
        self._next_dense: list[torch.Tensor] = []
        self._dense_inputs: dict[str, list[torch.Tensor]] = {}
        self._compressed_inputs: dict[str, list[torch.Tensor]] = {}
        self._memo = ReplayMemo() if reuse and self.reuse_outputs and needs.sequential else None
        self.reused = 0

    @classmethod
    def capture(
        cls,
        model: nn.Module,
        blocks: nn.ModuleList,
        batches: Iterable[torch.Tensor],
        device: torch.device,
        needs: StreamNeeds,
        offload_folder: str | None = None,
    ) -> BlockStreams:
        """Inputs of the first block for every batch of token ids, on ``device``."""
        hidden, calls = (
            capture_block_inputs(model, blocks, list(batches), stream_device=device)
            if needs.any
            else ([], [])
        )
        check_first_inputs_finite(hidden)
        return cls(hidden, calls, device, needs)

    # -- passes over one block ---------------------------------------------------------------------
    def _capture(self, block, states, modules) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        """(outputs, inputs of ``modules``) of one pass of ``block`` over ``states`` (see the offloaded
        version, which parks every result as soon as it is produced)."""
        return run_block_capturing(block, states, self.calls, modules, self.device, torch.float32)

    def _run(self, block: nn.Module, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """The outputs of ``block`` on the compressed ``states`` (memo-assisted in sequential mode)."""
        out = []
        for j, (s, c) in enumerate(zip(states, self.calls)):
            with self._memo.replay(block, j) if self._memo is not None else contextlib.nullcontext():
                out.append(run_block(block, s, c, self.device, torch.float32))
        return out

    def start_block(self, block: nn.Module, index: int, first_modules: list[str]) -> None:
        """Before any group of the still untouched ``block`` changes: one dense pass (its outputs are the
        next block's dense inputs; the dense inputs of ``first_modules``, each group's first linear, are
        kept) and, for block-wise statistics, one pass on the compressed stream keeping its inputs."""
        if self.needs.dense:
            with block_errors(index, DENSE_ERROR):
                self._next_dense, self._dense_inputs = self._capture(block, self.dense, first_modules)
        if self.needs.compressed and not self.needs.sequential:
            with block_errors(index, STATS_ERROR.replace("{exc}. ", "{exc}; ")):
                _, self._compressed_inputs = self._capture(block, self.compressed, first_modules)

    def _pairs(self, block: nn.Module, first_module: str) -> Iterator[Pair]:
        n = len(self.calls)
        dense = self._dense_inputs.pop(first_module) if self.needs.dense else [None] * n
        if not self.needs.compressed:
            yield from ((xd, None) for xd in dense)
            return
        if not self.needs.sequential:
            yield from zip(dense, self._compressed_inputs.pop(first_module))
            return
        module = block.get_submodule(first_module)
        for j, (xd, state, call) in enumerate(zip(dense, self.compressed, self.calls)):
            with self._memo.replay(block, j) if self._memo is not None else contextlib.nullcontext():
                xc = input_of(block, module, state, call, self.device, torch.float32)
            yield xd, xc

    def statistics(
        self, block: nn.Module, index: int, first_module: str, reduce: Callable[[Iterator[Pair]], Any]
    ):
        """``reduce`` over the (x_dense, x_compressed) inputs of ``first_module`` on every batch (x_c from
        the partly compressed ``block`` in sequential mode); None when no stream is active."""
        if not self.active:
            return None
        with block_errors(index, STATS_ERROR):
            return reduce(self._pairs(block, first_module))

    def advance(self, block: nn.Module, index: int) -> None:
        """Move the streams past ``block`` (now compressed): the dense stream takes the outputs of the
        dense pass, the compressed stream runs the compressed block."""
        self.dense, self._next_dense = self._next_dense, []
        self._compressed_inputs = {}
        if not self.needs.compressed:
            self.compressed = []
            return
        with block_errors(index, AFTER_ERROR):
            self.compressed = self._run(block, self.compressed)
        if self._memo is not None:  # the next block starts afresh: free the recorded tensors
            self.reused += self._memo.hits
            self._memo.hits = 0
            self._memo.clear()
