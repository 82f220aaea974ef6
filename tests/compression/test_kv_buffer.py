"""The preallocated KV cache of self-calibration: the same logits as transformers' DynamicCache, bit for bit,
so that the windows it samples are the ones the growing cache samples (only faster); caches of another
kind are left alone."""

from __future__ import annotations

import inspect

import pytest
import torch

from leanformers.compression import self_calibration
from leanformers.compression.kv_buffer import buffer_kv_cache_
from tests.tiny_models import random_ids, tiny_gpt2, tiny_qwen2


def _decode(model, ids: torch.Tensor, prefix: int, capacity: int | None):
    """(logits of the last position after the prefix and after each further token fed one at a time, the
    cache); ``capacity``: convert the model's cache after the prefix (None: keep transformers' own)."""
    # transformers 5.25 renamed the argument `past_key_values` to `cache`
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(input_ids=ids[:, :prefix], use_cache=True)
        cache = self_calibration._cache_of(out)
        if capacity is not None:
            assert buffer_kv_cache_(cache, capacity)
        logits = [out.logits[:, -1]]
        for s in range(prefix, ids.shape[1]):
            out = model(input_ids=ids[:, s : s + 1], use_cache=True, **{arg: self_calibration._cache_of(out)})
            logits.append(out.logits[:, -1])
    return torch.stack(logits), cache


def test_smollm2_decodes_bitwise_as_with_the_growing_cache(smollm2_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    ids = random_ids(3, 48, seed=1) % model.config.vocab_size
    expected, _ = _decode(model, ids, 8, None)
    logits, cache = _decode(model, ids, 8, 48)
    assert torch.equal(logits, expected)
    assert all(type(layer).__name__ == "BufferedLayer" for layer in cache.layers)
    assert cache.get_seq_length() == 48  # every fed position is held, in the buffer of 48


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_qwen2], ids=["gpt2", "qwen2"])
def test_other_architectures_decode_bitwise_as_with_the_growing_cache(make):
    model = make()
    ids = random_ids(2, 24, seed=3) % model.config.vocab_size
    assert torch.equal(_decode(model, ids, 5, 24)[0], _decode(model, ids, 5, None)[0])


def test_a_buffer_refuses_more_positions_than_it_holds():
    model = tiny_qwen2()
    ids = random_ids(1, 10, seed=0) % model.config.vocab_size
    with pytest.raises(ValueError, match="KV buffer of 6 positions cannot take position 7"):
        _decode(model, ids, 4, 6)


def test_other_caches_and_layers_are_left_alone():
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

    model = tiny_qwen2()
    with torch.no_grad():
        cache = self_calibration._cache_of(model(input_ids=random_ids(1, 8) % 128, use_cache=True))

    class OwnCache(DynamicCache):  # a model's own cache class: not ours to restructure
        pass

    own = OwnCache()
    own.layers = list(cache.layers)
    assert not buffer_kv_cache_(own, 16) and own.layers == cache.layers
    sliding = DynamicSlidingWindowLayer(sliding_window=4)
    sliding.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16))
    mixed = DynamicCache()
    mixed.layers = [sliding, cache.layers[0]]
    assert buffer_kv_cache_(mixed, 16)
    assert mixed.layers[0] is sliding and type(mixed.layers[1]).__name__ == "BufferedLayer"
    assert not buffer_kv_cache_(DynamicCache(), 16)  # nothing filled yet: nothing to convert
    assert not buffer_kv_cache_(None, 16)


def test_self_calibration_windows_do_not_depend_on_the_buffer(smollm2_path, monkeypatch):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tests.tiny_models import llama_config

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(32, 64, 2, 2, kv_heads=1, vocab=len(tokenizer), max_positions=128))
    model.eval()
    buffered = self_calibration.generate_self_calibration(model, tokenizer, 3, 64, seed=0, progress=False)
    monkeypatch.setattr(self_calibration, "buffer_kv_cache_", lambda cache, capacity: False)
    growing = self_calibration.generate_self_calibration(model, tokenizer, 3, 64, seed=0, progress=False)
    assert torch.equal(buffered, growing)
