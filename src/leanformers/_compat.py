"""Version differences and closed extension points of the libraries we integrate with, in one place."""

from __future__ import annotations

import enum

import torch
from peft.utils.peft_types import PeftType

__all__ = ["extend_peft_type", "first_output", "is_conv1d"]


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


def _add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add a member to a ``str``-mixin Enum after its creation (what ``aenum.extend_enum`` does)."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    if hasattr(enum_cls, "_sort_order_"):  # pragma: no cover - only some Python versions keep this
        member._sort_order_ = len(enum_cls._member_names_)
    # Set the class attribute before the member map so Enum's "cannot reassign member" guard stays quiet.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def extend_peft_type(name: str) -> PeftType:
    """``PeftType.<name>`` (value ``name``), added to peft's closed enum on first call; idempotent.

    peft 0.21's ``register_peft_method`` only accepts names that are already ``PeftType`` members. The
    member is the same object everywhere, so ``PeftType(name)``, ``PeftType.<name>`` and the string
    ``name`` all resolve to it.
    """
    return _add_enum_member(PeftType, name, name)
