"""What is checked when a compressed checkpoint loads (docs/pifa_format.md, "What loading checks").

A PIFA layer's forward gathers with whatever index it holds, so a checkpoint that was edited, truncated or
written by a buggy tool would otherwise load and run silently wrong. The quantizer checks, in order:

1. every module spec of ``quantization_config`` (``check_spec``): known keys with their JSON types (booleans
   are booleans, integers integers), a known kind and form, a rank that fits the shape;
2. before any weight is read, the safetensors headers of the checkpoint (``check_checkpoint_tensors``): every
   tensor a compressed module needs is present with its shape (and int32 gather indices), none is left over;
3. after loading, every gather index is a permutation of the right length (``check_gather_indices``);
   indices left on the meta device (offloaded) are read from the checkpoint file instead, never pulled in.

Each failure is one ValueError naming the module and the field.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn

from leanformers.storage.base import LOAD_HINT
from leanformers.storage.factorize import FORMS

__all__ = [
    "SPEC_TYPES",
    "check_checkpoint_tensors",
    "check_gather_indices",
    "check_permutation_values",
    "check_spec",
    "expected_tensors",
    "read_safetensors_header",
]

# spec key -> its JSON type; keys a writer may omit, with the default their absence means
SPEC_TYPES = {"kind": str, "in_features": int, "out_features": int, "rank": int, "bias": bool, "form": str}
OPTIONAL_SPEC = {"input_permuted": (bool, False)}
_FIX = "the checkpoint's config.json was edited or written by another tool; re-create it with leanformers-compress"


def check_spec(name: str, spec) -> None:
    """Raise ValueError naming ``name`` and the field when ``spec`` is not a valid compressed-module spec."""
    if not isinstance(spec, dict):
        raise ValueError(f"quantization_config.modules[{name!r}] must be a dict, got {type(spec).__name__}")
    if spec.get("kind") not in ("pifa", "lowrank"):
        raise ValueError(
            f"quantization_config.modules[{name!r}] = {spec!r} is not a PIFA/low-rank spec (kind 'pifa' or "
            f"'lowrank'); {_FIX}"
        )
    required = [k for k in SPEC_TYPES if not (k == "form" and spec.get("kind") == "lowrank")]
    missing = [k for k in required if k not in spec]
    if missing:
        raise ValueError(f"quantization_config.modules[{name!r}] lacks {missing}; {_FIX}")
    unknown = sorted(set(spec) - set(SPEC_TYPES) - set(OPTIONAL_SPEC))
    if unknown:
        raise ValueError(
            f"quantization_config.modules[{name!r}] has keys {unknown} this leanformers does not know (a newer "
            "writer?): upgrade leanformers"
        )
    for key, value in spec.items():
        typ = SPEC_TYPES.get(key) or OPTIONAL_SPEC[key][0]
        if type(value) is not typ:  # exact: True is not an int, "false" is not a bool
            raise ValueError(
                f"quantization_config.modules[{name!r}].{key} must be a JSON {typ.__name__}, got {value!r}; {_FIX}"
            )
    m, n, r = spec["out_features"], spec["in_features"], spec["rank"]
    if m < 1 or n < 1 or not 1 <= r <= min(m, n):
        raise ValueError(
            f"quantization_config.modules[{name!r}]: rank {r} does not fit a {m} x {n} layer (1 <= rank <= "
            f"{min(m, n)}); {_FIX}"
        )
    if spec["kind"] == "pifa":
        if spec["form"] not in (*FORMS, "col"):
            raise ValueError(
                f"quantization_config.modules[{name!r}].form must be one of {FORMS}, got {spec['form']!r}"
            )
        if spec.get("input_permuted", False) and spec["form"] == "row":
            raise ValueError(
                f"quantization_config.modules[{name!r}]: input_permuted needs the column form; {_FIX}"
            )


def expected_tensors(spec: dict) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """tensor suffix -> (shape, safetensors dtype or None for "any float") of a compressed module."""
    m, n, r = spec["out_features"], spec["in_features"], spec["rank"]
    if spec["kind"] == "lowrank":
        out = {"weight": ((m, r), None), "weight_in": ((r, n), None)}
    elif spec["form"] == "row":
        out = {"weight": ((r, n), None), "coeff": ((m - r, r), None), "output_index": ((m,), "I32")}
    else:
        out = {"weight": ((m, r), None), "coeff": ((r, n - r), None), "input_index": ((n,), "I32")}
    if spec["bias"]:
        out["bias"] = ((m,), None)
    return out


def read_safetensors_header(path: str | Path) -> dict[str, dict]:
    """The tensor table of a safetensors file (name -> dtype, shape, offsets) without reading any data;
    a ValueError naming the file when it is truncated or not safetensors."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(
                f"{path} is not a safetensors file (it has {size} bytes); the download or copy was cut short"
            )
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ValueError(
                f"{path} is truncated: its header says {length} bytes, the file has {size}; download it again"
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path} has a corrupt safetensors header; download it again") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + length + end > size:
        raise ValueError(
            f"{path} is truncated: its tensors need {8 + length + end} bytes, the file has {size}; download it again"
        )
    return header


def _by_module(keys) -> dict[str, set[str]]:
    """module path -> the tensor names stored under it (``a.b.weight`` -> ``{"a.b": {"weight"}}``)."""
    table: dict[str, set[str]] = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        table.setdefault(module, set()).add(leaf)
    return table


def _checkpoint_key(name: str, stored: dict[str, set[str]], prefix: str) -> str:
    """The name under which module ``name`` is stored (a head checkpoint loaded into its base model and back)."""
    for candidate in (
        name,
        f"{prefix}.{name}" if prefix else None,
        name.split(".", 1)[1] if "." in name else None,
    ):
        if candidate in stored:
            return candidate
    return name


def check_checkpoint_tensors(modules: dict[str, dict], files, prefix: str = "") -> dict[str, Path]:
    """Every tensor each compressed module needs is in the checkpoint with its shape and dtype, and no other
    tensor is stored under the module. Reads only the safetensors headers. Returns tensor name -> file."""
    where: dict[str, Path] = {}
    table: dict[str, dict] = {}
    for file in files:
        header = read_safetensors_header(file)
        table.update(header)
        where.update(dict.fromkeys(header, Path(file)))
    stored_by_module = _by_module(table)
    for name, spec in modules.items():
        stored = _checkpoint_key(name, stored_by_module, prefix)
        expected = expected_tensors(spec)
        for suffix, (shape, dtype) in expected.items():
            entry = table.get(f"{stored}.{suffix}")
            if entry is None:
                raise ValueError(f"{name}: the checkpoint has no {suffix!r} tensor (spec {spec}); {_FIX}")
            if tuple(entry["shape"]) != shape or (dtype is not None and entry["dtype"] != dtype):
                raise ValueError(
                    f"{name}.{suffix}: the checkpoint holds {entry['dtype']} {tuple(entry['shape'])}, the spec needs "
                    f"{dtype or 'a float'} {shape}; {_FIX}"
                )
        extra = sorted(stored_by_module.get(stored, set()) - set(expected) - {LOAD_HINT})
        if extra:
            raise ValueError(
                f"{name}: the checkpoint stores {extra}, which its spec {spec} does not have; {_FIX}"
            )
    return where


def check_permutation_values(name: str, field: str, index: torch.Tensor, size: int) -> None:
    """ValueError unless ``index`` is an int32 permutation of range(size)."""
    if index.dtype != torch.int32 or index.shape != (size,):
        raise ValueError(
            f"{name}.{field} must be int32 of shape ({size},), got {index.dtype} {tuple(index.shape)}; {_FIX}"
        )
    idx = index.detach().to("cpu", torch.int64)
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= size:
        raise ValueError(f"{name}.{field} holds {low if low < 0 else high}, outside 0..{size - 1}; {_FIX}")
    counts = torch.bincount(idx, minlength=size)
    if not bool((counts == 1).all()):
        twice = int(torch.nonzero(counts > 1)[0])
        raise ValueError(
            f"{name}.{field} is not a permutation: {twice} appears {int(counts[twice])} times; {_FIX}"
        )


def check_gather_indices(model: nn.Module, files: dict[str, Path], prefix: str = "") -> None:
    """Every PIFALinear's gather index is a permutation; an index on the meta device (offloaded) is read from
    the checkpoint file (a few KB) instead of being materialised in the model. All indices are checked in
    one vectorised pass; a failure is then located and named layer by layer."""
    from safetensors import safe_open

    from leanformers.storage.pifa_linear import PIFALinear

    stored_by_module = _by_module(files)
    found = []  # (name, field, index, size)
    for name, module in model.named_modules():
        if not isinstance(module, PIFALinear):
            continue
        field = "output_index" if module.form == "row" else "input_index"
        index = module.gather_index
        size = module.out_features if module.form == "row" else module.in_features
        if index.device.type == "meta":
            key = f"{_checkpoint_key(name, stored_by_module, prefix)}.{field}"
            if key not in files:
                continue  # not from a checkpoint (a model built in memory): nothing to check against
            with safe_open(files[key], framework="pt") as f:
                index = f.get_tensor(key)
        found.append((name, field, index, size))
    if not found or _all_permutations([(i, n) for _, _, i, n in found]):
        return
    for name, field, index, size in found:
        check_permutation_values(name, field, index, size)


def _all_permutations(indices: list[tuple[torch.Tensor, int]]) -> bool:
    """Whether every (index, size) is an int32 permutation of range(size), in one pass over all of them."""
    if any(i.dtype != torch.int32 or i.shape != (n,) for i, n in indices):
        return False
    sizes = torch.tensor([n for _, n in indices])
    offsets = torch.cumsum(sizes, 0) - sizes
    flat = torch.cat([i.detach().to("cpu", torch.int64) for i, _ in indices])
    limit = torch.repeat_interleave(sizes, sizes)
    if not bool(((flat >= 0) & (flat < limit)).all()):
        return False
    counts = torch.bincount(flat + torch.repeat_interleave(offsets, sizes), minlength=int(sizes.sum()))
    return bool((counts == 1).all())
