"""Block-at-a-time access to a safetensors checkpoint folder, for the streaming MPIFA mode.

* ``CheckpointReader``: tensors of a folder (``model.safetensors`` or a sharded folder with its
  ``model.safetensors.index.json``) read by name on demand; each shard is opened for one read and closed,
  so no mapping of the whole checkpoint stays resident.
* ``materialize`` / ``release``: give the meta parameters of one submodule real tensors from the reader
  (tied parameters stay tied), and send them back to meta (freeing their memory).
* ``ShardWriter``: writes tensors as they are produced into safetensors shards of a staging folder and
  names them at the end as ``save_pretrained`` does (``model-0000k-of-0000n.safetensors`` + index).
* ``PeakHostMemory``: the peak resident memory (RSS) of this process over a block of code.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from leanformers.storage.validation import read_safetensors_header

__all__ = [
    "CheckpointReader",
    "PeakHostMemory",
    "ShardWriter",
    "materialize",
    "release",
    "release_host_memory",
    "status_kib",
]

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


class CheckpointReader:
    """Tensor names -> shard files of a safetensors checkpoint folder; ``read`` loads only what is asked.

    Raises FileNotFoundError naming the fix when the folder holds no safetensors weights (a pickled
    ``pytorch_model.bin`` cannot be read lazily and safely).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(
                f"streaming compression reads a local model folder; {self.folder} is not one (download a Hub "
                "model first, e.g. `hf download <id> --local-dir <folder>`)"
            )
        index = self.folder / SAFE_INDEX
        single = self.folder / SAFE_WEIGHTS
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self._inside(file) for name, file in weight_map.items()}
        elif single.is_file():
            self.files = dict.fromkeys(read_safetensors_header(single), single)
        else:
            found = sorted(p.name for p in self.folder.iterdir() if p.is_file())
            raise FileNotFoundError(
                f"streaming compression needs safetensors weights ({SAFE_WEIGHTS} or {SAFE_INDEX}) in "
                f"{self.folder}; found {found[:12]}. Re-save the model with save_pretrained() (safetensors), "
                "or compress it in memory (without --stream)"
            )
        missing = sorted({str(p.name) for p in self.files.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"{self.folder}: the index names shard files that are missing: {missing}")
        for file in set(self.files.values()):  # a truncated shard is named now, not a traceback mid-run
            read_safetensors_header(file)

    def _inside(self, file: str) -> Path:
        """A shard named by the index, confined to the checkpoint folder: a name with a path ("../x", "/etc/x",
        "sub/x") would read another file into the output."""
        path = Path(file)
        if path.name != file or file in ("", ".", ".."):
            raise ValueError(
                f"{self.folder / SAFE_INDEX} names the shard {file!r}, which is not a plain file name in the "
                "checkpoint folder; the index is corrupt or was crafted to read other files"
            )
        return self.folder / file

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """name -> tensor (checkpoint dtype, CPU, owning its memory) for every name in ``names``."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        out = {}
        for file, keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                for key in keys:
                    out[key] = f.get_tensor(key).clone()  # own the memory: the file mapping closes here
        return out


def _alias_groups(module: nn.Module, kind: str) -> list[tuple[torch.Tensor, list[str]]]:
    """(tensor, every name it has in ``module``) for its parameters or persistent buffers, so that tied
    weights (one tensor under two names) are loaded once and stay one tensor."""
    groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
    if kind == "param":
        items = module.named_parameters(remove_duplicate=False)
    else:
        persistent = set(module.state_dict(keep_vars=True))
        items = ((n, b) for n, b in module.named_buffers(remove_duplicate=False) if n in persistent)
    for name, tensor in items:
        groups.setdefault(id(tensor), (tensor, []))[1].append(name)
    return list(groups.values())


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor, kind: str) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    if kind == "param":
        parent._parameters[leaf] = value
    else:
        parent._buffers[leaf] = value


def materialize(module: nn.Module, prefix: str, reader: CheckpointReader, skip: tuple[str, ...] = ()) -> None:
    """Replace the meta parameters and persistent buffers of ``module`` (named ``prefix`` + name in the
    checkpoint) by the checkpoint's tensors, cast to each meta tensor's dtype as ``from_pretrained``
    casts them. Names starting with one of ``skip`` (the blocks, the output head) are left on meta.

    Raises KeyError-like ValueError when a tensor is absent (a model whose checkpoint names differ from
    its module names, which ``from_pretrained`` converts, is not supported in streaming mode).
    """
    todo = []  # (kind, meta tensor, names, checkpoint key)
    for kind in ("param", "buffer"):
        for tensor, names in _alias_groups(module, kind):
            if tensor.device.type != "meta" or (skip and all(n.startswith(skip) for n in names)):
                continue
            present = [n for n in names if prefix + n in reader]
            if not present:
                raise ValueError(
                    f"the checkpoint has no tensor {prefix + names[0]!r}: streaming compression needs a "
                    "checkpoint whose tensor names are the model's own (compress it in memory instead)"
                )
            todo.append((kind, tensor, names, prefix + present[0]))
    values = reader.read([key for *_, key in todo])
    for kind, tensor, names, key in todo:
        value = values.pop(key)
        if value.shape != tensor.shape:
            raise ValueError(
                f"{key}: the checkpoint holds shape {tuple(value.shape)}, the model expects {tuple(tensor.shape)}"
            )
        if value.is_floating_point():
            value = value.to(tensor.dtype)
        if kind == "param":
            value = nn.Parameter(value, requires_grad=tensor.requires_grad)
        for name in names:
            _set_tensor(module, name, value, kind)


def release_host_memory() -> None:
    """Return freed heap memory to the OS (glibc keeps freed blocks of a few MB in its arenas, which
    would show as a resident-memory creep from block to block); a no-op elsewhere."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def release(module: nn.Module) -> None:
    """Send every parameter and buffer of ``module`` to the meta device (its memory is freed)."""
    module.to("meta")
    release_host_memory()


class ShardWriter:
    """Safetensors shards written one call at a time into ``staging``, named like ``save_pretrained``'s
    at ``finish`` (a single shard is ``model.safetensors`` without index)."""

    def __init__(self, staging: str | os.PathLike):
        self.staging = Path(staging)
        self.shards: list[tuple[str, list[str]]] = []
        self.total_size = 0

    @property
    def keys(self) -> set[str]:
        return {k for _, keys in self.shards for k in keys}

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``tensors`` (CPU) as the next shard now."""
        from safetensors.torch import save_file

        if not tensors:
            return
        clash = self.keys & set(tensors)
        if clash:
            raise RuntimeError(f"tensors written twice: {sorted(clash)[:5]}")
        name = f".shard-{len(self.shards):05d}.safetensors"
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(tensors, self.staging / name, metadata={"format": "pt"})
        self.total_size += sum(v.numel() * v.element_size() for v in tensors.values())
        self.shards.append((name, list(tensors)))

    def finish(self, total_parameters: int) -> list[str]:
        """Rename the shards to their final names and write the index; returns the file names."""
        n = len(self.shards)
        if n == 0:
            raise RuntimeError("no tensor was written")
        if n == 1:
            os.replace(self.staging / self.shards[0][0], self.staging / SAFE_WEIGHTS)
            return [SAFE_WEIGHTS]
        weight_map, names = {}, []
        for k, (tmp, keys) in enumerate(self.shards, start=1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(self.staging / tmp, self.staging / final)
            weight_map.update(dict.fromkeys(keys, final))
            names.append(final)
        index = {
            "metadata": {"total_parameters": total_parameters, "total_size": self.total_size},
            "weight_map": weight_map,
        }
        (self.staging / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (e.g. "VmRSS", "VmHWM"); None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakHostMemory:
    """Peak resident memory (bytes) of this process inside the ``with`` block.

    On Linux the kernel's high-water mark (VmHWM) is reset on entry (``/proc/self/clear_refs``) and read on
    exit: exact, no sampling. Elsewhere, or where the reset is not allowed, the lifetime peak
    (``getrusage`` ru_maxrss) is reported and ``exact`` is False (it may include earlier peaks).
    """

    def __init__(self) -> None:
        self.start = self.peak = 0
        self.exact = False

    def __enter__(self) -> PeakHostMemory:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = status_kib("VmHWM") is not None
        except OSError:
            self.exact = False
        rss = status_kib("VmRSS")
        self.start = rss * 1024 if rss is not None else 0
        return self

    def __exit__(self, *exc) -> None:
        self.peak = self.so_far()

    def so_far(self) -> int:
        """The peak up to now (bytes)."""
        hwm = status_kib("VmHWM") if self.exact else None
        if hwm is not None:
            return hwm * 1024
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    @property
    def peak_gb(self) -> float:
        return self.peak / 2**30
