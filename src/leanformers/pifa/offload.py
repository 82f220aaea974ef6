"""Where the calibration activations live between passes: ``MPIFAConfig.offload``.

The two activation streams (dense and compressed inputs of the current block, one (batch, seq, hidden)
tensor per calibration batch) and the dense inputs captured for each group are, per block, about
``2 + groups`` copies of the calibration set's hidden states: 128 x 2048 tokens x 4096 features in
float32 is 4 GiB per copy. ``offload`` chooses where they wait:

* ``"none"``: on the compute device (``BlockStreams``, the fastest);
* ``"cpu"``: in host memory (the GPU then holds one batch at a time);
* ``"disk"``: in files of ``offload_folder`` (default: the system temp folder), one file per batch,
  memory-mapped and unlinked at once, so host memory holds a batch and the pages the OS keeps cached,
  and nothing is left behind on disk when the process ends.

With ``"cpu"`` or ``"disk"`` every pass over a block runs batch by batch and parks each result right
away, so no pass ever holds a whole stream in memory. The arithmetic is the in-memory one (the same
block calls on the same float32 tensors): results are bit-identical to ``"none"``.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterable

import torch
from torch import nn

from leanformers.pifa.calibration import capture_block_inputs, run_block, run_block_capturing
from leanformers.pifa.config import MPIFAConfig
from leanformers.pifa.streams import (
    AFTER_ERROR,
    DENSE_ERROR,
    BlockStreams,
    block_errors,
    check_first_inputs_finite,
    stream_options,
)

__all__ = ["DiskStore", "HostStore", "OffloadedStreams", "make_streams"]


class HostStore:
    """Parks tensors in host memory (float32, CPU)."""

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to("cpu", torch.float32)


class DiskStore:
    """Parks tensors in files of ``folder``: each is written, memory-mapped and unlinked at once (the
    mapping keeps the data; the OS frees it when the tensor is garbage-collected)."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = os.fspath(folder) if folder is not None else tempfile.gettempdir()
        if not os.path.isdir(self.folder):
            raise FileNotFoundError(f"offload_folder {self.folder} does not exist")
        self.bytes_written = 0

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        host = tensor.detach().to("cpu", torch.float32).contiguous()
        path = os.path.join(self.folder, f".mpifa-offload-{os.getpid()}-{uuid.uuid4().hex}.bin")
        try:
            host.numpy().tofile(path)
            del host
            mapped = torch.from_file(path, shared=False, size=tensor.numel(), dtype=torch.float32)
        finally:
            if os.path.exists(path):
                os.unlink(path)
        self.bytes_written += tensor.numel() * 4
        return mapped.view(tensor.shape)


class OffloadedStreams(BlockStreams):
    """``BlockStreams`` whose activations wait in a store (host memory or disk) and whose passes run
    one batch at a time, each result parked as soon as it is produced."""

    store: HostStore | DiskStore

    @classmethod
    def capture(
        cls,
        model: nn.Module,
        blocks: nn.ModuleList,
        batches: Iterable[torch.Tensor],
        device: torch.device,
        config: MPIFAConfig,
        active: bool,
    ) -> OffloadedStreams:
        store = DiskStore(config.offload_folder) if config.offload == "disk" else HostStore()
        hidden, calls = [], []
        if active:
            for batch in batches:  # one batch at a time: never the whole first stream in memory
                h, c = capture_block_inputs(model, blocks, [batch], stream_device=torch.device("cpu"))
                check_first_inputs_finite(h)
                hidden.append(store.put(h[0]))
                calls.append(c[0])
        # no replay memo: it would keep activations of whole batches on the compute device
        streams = cls(hidden, calls, device, active, **stream_options(config), reuse=False)
        streams.store = store
        return streams

    def run_dense(self, block: nn.Module, index: int, first_modules: list[str]) -> None:
        if not self.active:
            return
        outputs, inputs = [], {p: [] for p in first_modules}
        with block_errors(index, DENSE_ERROR):
            for s, c in zip(self.dense, self.calls):
                out, captured = run_block_capturing(
                    block, [s], [c], first_modules, self.device, torch.float32
                )
                outputs.append(self.store.put(out[0]))
                for p in first_modules:
                    inputs[p].append(self.store.put(captured[p][0]))
        self._next_dense, self._dense_inputs = outputs, inputs

    def advance(self, block: nn.Module, index: int) -> None:
        self.dense, self._next_dense = self._next_dense, []
        if not self.active:
            self.compressed = []
            return
        compressed = []
        with block_errors(index, AFTER_ERROR):
            for s, c in zip(self.compressed, self.calls):
                compressed.append(self.store.put(run_block(block, s, c, self.device, torch.float32)))
        self.compressed = compressed


def make_streams(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    config: MPIFAConfig,
    active: bool,
) -> BlockStreams:
    """The streams ``config.offload`` asks for, holding the first block's inputs."""
    cls = BlockStreams if config.offload == "none" else OffloadedStreams
    return cls.capture(model, blocks, batches, device, config, active)
