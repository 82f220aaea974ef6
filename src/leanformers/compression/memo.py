"""Reuse of sub-module outputs across the replays of the block being compressed.

The compressed stream replays the block once per group (up to the group's first linear) and once more
to advance past it. Sub-modules that an earlier replay already ran, unchanged and on bitwise-equal
inputs, give the same output again: ``ReplayMemo`` returns the recorded output instead of recomputing
it (for LLaMA: the attention is run twice per block instead of four times, q/k/v and gate/up are not
re-applied). This is a cache, not an approximation: an entry is used only when

* the sub-module tree is the same objects (a linear replaced by its compressed layer is a miss), every
  parameter and buffer is the same tensor at the same in-place version counter, and every module's plain
  attributes (``training``, ``input_permuted``, ...) are equal;
* every input (positional and keyword, nested tuples/lists/dicts) is bitwise equal (``torch.equal``,
  same shape/dtype/device) or the very same object for non-tensors;
* no recorded tensor (input or output) was modified in place since it was recorded (version counters).

Assumption: a sub-module's output is a deterministic function of its inputs, parameters, buffers and
plain attributes (true for eval-mode transformer layers: no dropout, no ``use_cache`` state).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from leanformers._compat import is_conv1d

__all__ = ["ReplayMemo"]

_PLAIN = (bool, int, float, str, type(None))


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _same(a, b) -> bool:
    """Bitwise-equal tensors / equal containers / equal plain values / the same object otherwise."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a is b:
            return True
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, _PLAIN):
        return type(a) is type(b) and a == b
    return a is b


def _module_state(module: nn.Module) -> tuple:
    """What identifies the function of ``module``: its sub-module objects with their plain attributes,
    and each parameter/buffer tensor with its in-place version counter."""
    modules = tuple(
        (m, tuple((k, v) for k, v in vars(m).items() if isinstance(v, _PLAIN))) for m in module.modules()
    )
    tensors = tuple((t, t._version) for t in (*module.parameters(), *module.buffers()) if t is not None)
    return modules, tensors


def _same_state(recorded: tuple, current: tuple) -> bool:
    (mods_a, tens_a), (mods_b, tens_b) = recorded, current
    if len(mods_a) != len(mods_b) or len(tens_a) != len(tens_b):
        return False
    if any(ma is not mb or sa != sb for (ma, sa), (mb, sb) in zip(mods_a, mods_b)):
        return False
    return all(ta is tb and va == vb for (ta, va), (tb, vb) in zip(tens_a, tens_b))


@dataclass
class _Entry:
    state: tuple
    args: tuple
    kwargs: dict
    output: object
    versions: tuple  # (tensor, _version) of every recorded input and output tensor

    def untouched(self) -> bool:
        return all(t._version == v for t, v in self.versions)


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


class ReplayMemo:
    """Recorded outputs of the sub-modules of one block, per calibration batch.

    Only sub-modules that contain a compressed layer and no plain (still dense) linear are recorded:
    those are the finished parts of the block that later replays run again. ``clear()`` after each block.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[int, nn.Module], _Entry] = {}
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._entries.clear()

    @staticmethod
    def _finished(block: nn.Module) -> list[nn.Module]:
        from leanformers.storage.layers import CompressedLinear

        found = []
        for module in block.modules():
            if module is block:
                continue
            subs = list(module.modules())
            if any(isinstance(m, CompressedLinear) for m in subs) and not any(
                _is_plain_linear(m) for m in subs
            ):
                found.append(module)
        return found

    @contextlib.contextmanager
    def replay(self, block: nn.Module, batch: int):
        """Inside, calls of the finished sub-modules of ``block`` on calibration batch ``batch`` reuse
        a recorded output when it is valid (see the module docstring) and record one otherwise."""
        patched = []
        for module in self._finished(block):
            own = module.__dict__.get("forward")  # e.g. an accelerate hook's wrapped forward
            module.forward = self._wrap(module, module.forward, batch)
            patched.append((module, own))
        try:
            yield
        finally:
            for module, own in patched:
                if own is None:
                    del module.forward
                else:
                    module.forward = own

    def _wrap(self, module: nn.Module, forward, batch: int):
        key = (batch, module)

        def memo_forward(*args, **kwargs):
            entry = self._entries.get(key)
            state = _module_state(module)
            if (
                entry is not None
                and entry.untouched()
                and _same_state(entry.state, state)
                and _same(entry.args, args)
                and _same(entry.kwargs, kwargs)
            ):
                self.hits += 1
                return entry.output
            self.misses += 1
            output = forward(*args, **kwargs)
            versions = tuple((t, t._version) for t in _tensors((args, kwargs, output)))
            self._entries[key] = _Entry(state, args, dict(kwargs), output, versions)
            # An entry for a finished ancestor supersedes those of its sub-modules (frees their tensors).
            for sub in module.modules():
                if sub is not module:
                    self._entries.pop((batch, sub), None)
            return output

        return memo_forward
