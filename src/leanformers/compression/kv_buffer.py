"""A KV cache that writes into buffers allocated once, for self-calibration's decode loop.

transformers' ``DynamicCache`` grows by ``torch.cat``: every decode step copies the whole cache of every
layer, a third of a step of SmolLM2-135M at batch 24 and position 256 on a CPU (docs/benchmarks.md §20).
``buffer_kv_cache_`` moves the layers of such a cache, after the prompt's forward, into buffers of the
final length and hands attention the filled prefix, a view of the same numbers: the logits are bitwise
those of ``DynamicCache`` (tests/compression/test_kv_buffer.py), so the sampled windows do not change,
only the time they take. Only the cache the model chose itself is converted, and only its plain
full-attention layers: a model with its own cache class (state-space, hybrid, offloaded) keeps it.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["buffer_kv_cache_"]


@functools.cache
def _buffered_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys / values are the filled first positions of fixed buffers."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
            super().__init__()
            batch, heads, length, _ = keys.shape
            self._keys = keys.new_empty(batch, heads, capacity, keys.shape[-1])
            self._values = values.new_empty(batch, heads, capacity, values.shape[-1])
            self._keys[:, :, :length] = keys
            self._values[:, :, :length] = values
            self.capacity, self.device = capacity, keys.device
            self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            start = self.keys.shape[-2]  # the filled positions
            end = start + key_states.shape[-2]
            if end > self.capacity:
                raise ValueError(f"KV buffer of {self.capacity} positions cannot take position {end}")
            self._keys[:, :, start:end] = key_states
            self._values[:, :, start:end] = value_states
            self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
            return self.keys, self.values

    return BufferedLayer


def buffer_kv_cache_(cache, capacity: int) -> bool:
    """In place: every filled plain ``DynamicLayer`` of ``cache`` (a ``DynamicCache`` a model returned)
    becomes a layer holding up to ``capacity`` positions in preallocated buffers, its keys and values
    copied over. Returns whether anything was converted; any other cache (another class, a transformers
    whose cache API differs) is left as it is, which gives the same numbers, only slower.

    Args:
        cache: the model's cache after a forward; its layers' keys / values are (batch, heads, length, dim).
        capacity: the most positions any layer will hold (the window length).
    """
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return False
    if type(cache) is not DynamicCache or not isinstance(getattr(cache, "layers", None), list):
        return False
    if getattr(cache, "offloading", False):  # offloading moves the layers' tensors between devices
        return False
    buffered = _buffered_layer_class()
    converted = False
    for i, layer in enumerate(cache.layers):
        plain = type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4
        if plain and layer.keys.shape[-2] <= capacity:
            cache.layers[i] = buffered(layer.keys, layer.values, capacity)
            converted = True
    return converted
