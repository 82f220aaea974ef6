"""Where the calibration activations live between passes: ``CompressionConfig.offload``.

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

from leanformers.compression.replay import capture_block_inputs, run_block, run_block_capturing
from leanformers.compression.streams import BlockStreams, StreamNeeds, check_first_inputs_finite

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
        needs: StreamNeeds,
        offload_folder: str | None = None,
        disk: bool = False,
    ) -> OffloadedStreams:
        store = DiskStore(offload_folder) if disk else HostStore()
        hidden, calls = [], []
        if needs.any:
            for batch in batches:  # one batch at a time: never the whole first stream in memory
                h, c = capture_block_inputs(model, blocks, [batch], stream_device=torch.device("cpu"))
                check_first_inputs_finite(h)
                hidden.append(store.put(h[0]))
                calls.append(c[0])
        # no replay memo: it would keep activations of whole batches on the compute device
        streams = cls(hidden, calls, device, needs, reuse=False)
        streams.store = store
        return streams

    def _capture(self, block, states, modules):
        outputs, inputs = [], {p: [] for p in modules}
        for s, c in zip(states, self.calls):
            out, captured = run_block_capturing(block, [s], [c], modules, self.device, torch.float32)
            outputs.append(self.store.put(out[0]))
            for p in modules:
                inputs[p].append(self.store.put(captured[p][0]))
        return outputs, inputs

    def _run(self, block, states):
        return [
            self.store.put(run_block(block, s, c, self.device, torch.float32))
            for s, c in zip(states, self.calls)
        ]


def make_streams(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    offload: str,
    needs: StreamNeeds,
    offload_folder: str | None = None,
) -> BlockStreams:
    """The streams ``offload`` ("none", "cpu", "disk") asks for, holding the first block's inputs."""
    if offload == "none":
        return BlockStreams.capture(model, blocks, batches, device, needs)
    return OffloadedStreams.capture(
        model, blocks, batches, device, needs, offload_folder, disk=offload == "disk"
    )
