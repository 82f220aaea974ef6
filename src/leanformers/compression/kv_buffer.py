"""A KV cache that writes into buffers allocated once, for self-calibration's decode loop.

transformers' ``DynamicCache`` grows by ``torch.cat``: every decode step copies the whole cache of every
layer, a third of a step of SmolLM2-135M at batch 24 and position 256 on a CPU (docs/benchmarks.md §20).
``buffered_cache`` keeps its layers' keys and values in buffers of the final length and hands attention
the filled prefix, a view of the same numbers: the logits are bitwise those of ``DynamicCache``
(tests/compression/test_kv_buffer.py), so the sampled windows do not change, only the time they take.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["buffered_cache"]


@functools.cache
def _buffer_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys / values are the first ``length`` positions of fixed buffers."""

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self.length = 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.device = key_states.device
            batch, heads, _, _ = key_states.shape
            shape = (batch, heads, self.capacity)
            self._keys = key_states.new_empty(*shape, key_states.shape[-1])
            self._values = value_states.new_empty(*shape, value_states.shape[-1])
            self.keys, self.values = self._keys[:, :, :0], self._values[:, :, :0]
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise ValueError(f"KV buffer of {self.capacity} positions cannot take position {end}")
            self._keys[:, :, self.length : end] = key_states
            self._values[:, :, self.length : end] = value_states
            self.length = end
            self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
            return self.keys, self.values

        def reset(self) -> None:
            self.length = 0
            super().reset()

    return BufferedLayer


def buffered_cache(model, capacity: int):
    """A ``DynamicCache`` for ``model`` whose full-attention layers hold up to ``capacity`` positions in
    preallocated buffers; None where this transformers' cache API differs (the caller then lets the
    model build its own cache, which gives the same numbers, only slower). Sliding-window and other
    special layers stay as transformers builds them."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        cache = DynamicCache(config=model.config)
        layers = cache.layers
    except (ImportError, AttributeError, TypeError, KeyError):
        return None
    if not layers or not isinstance(layers, list):
        return None
    buffered = _buffer_layer_class()
    cache.layers = [buffered(capacity) if type(layer) is DynamicLayer else layer for layer in layers]
    return cache
