"""The N:M semi-structured format: pruned weights stay in their dense tensors, with exact zeros.

Such a checkpoint is a plain Hugging Face folder that reloads without leanformers. What was pruned is
recorded as the plain ``config.json`` key ``sparsity`` (outside ``quantization_config``, which would make
transformers look for a quantizer):

    "sparsity": {"format": "semi-structured", "pattern": "2:4", "method": "wanda-2:4",
                 "modules": [<module names>], "leanformers_version": "..."}

``check_pattern`` verifies the zeros before a save (a module that lost its pattern would be a silently
wrong claim in the card and config).
"""

from __future__ import annotations

import torch
from torch import nn

from leanformers._compat import is_conv1d
from leanformers._version import __version__

__all__ = ["SPARSITY_KEY", "check_pattern", "parse_pattern", "semi_structured_counts", "sparsity_record"]

SPARSITY_KEY = "sparsity"


def parse_pattern(pattern: str) -> tuple[int, int]:
    """ "2:4" -> (2, 4): at most n non-zeros in every m consecutive inputs of a row, 0 < n < m."""
    try:
        n, m = (int(p) for p in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"an N:M pattern looks like '2:4', got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"an N:M pattern needs 0 < N < M, got {pattern!r}")
    return n, m


def sparsity_record(method: str, pattern: str, modules: list[str]) -> dict:
    """The ``config.json`` record of a semi-structured model."""
    parse_pattern(pattern)
    return {
        "format": "semi-structured",
        "pattern": pattern,
        "method": method,
        "modules": list(modules),
        "leanformers_version": __version__,
    }


def semi_structured_counts(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zeros per group of ``m`` consecutive inputs: weight (out, in) -> (out, in // m) int."""
    if weight.ndim != 2 or weight.shape[1] % m:
        raise ValueError(f"a weight of shape {tuple(weight.shape)} has no whole groups of {m} inputs")
    return (weight.reshape(weight.shape[0], -1, m) != 0).sum(-1)


def check_pattern(model: nn.Module, record: dict) -> None:
    """Raise ValueError naming the first module whose weight breaks the recorded N:M pattern. Records of
    other formats (a registered compressor's own) are that compressor's to check."""
    if not isinstance(record, dict) or not isinstance(record.get("format"), str):
        raise ValueError(
            f"config.{SPARSITY_KEY} = {record!r} is not a sparsity record (a dict with a 'format')"
        )
    if record["format"] != "semi-structured":
        return
    n, m = parse_pattern(record.get("pattern", ""))
    for name in record.get("modules", []):
        module = model.get_submodule(name)
        weight = module.weight.t() if is_conv1d(module) else module.weight  # (out, in)
        if weight.device.type == "meta":
            continue
        worst = int(semi_structured_counts(weight.detach(), m).max())
        if worst > n:
            raise ValueError(
                f"{name} has {worst} non-zeros in a group of {m} inputs, above the recorded {n}:{m} pattern: "
                "its weights changed after pruning (prune again, or drop config.sparsity)"
            )
