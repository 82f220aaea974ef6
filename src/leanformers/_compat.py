"""Version differences of the libraries we integrate with, absorbed in one place."""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version

__all__ = ["TRANSFORMERS_VERSION", "first_output", "is_conv1d"]

TRANSFORMERS_VERSION = Version(transformers.__version__)


def first_output(output):
    """Hidden states from a decoder/encoder layer: a Tensor in transformers 5.x, a tuple in 4.x."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"cannot read hidden states from a layer output of type {type(output).__name__}")


def is_conv1d(module: torch.nn.Module) -> bool:
    """GPT-2 style Conv1D: weight stored (in, out), y = x W + b."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")
