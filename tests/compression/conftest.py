"""Fixtures of the compression tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_lm_folder(tmp_path_factory, smollm2_path):
    """A tiny LLaMA (2 blocks, random weights) saved with the real SmolLM2 tokenizer: the command line end to end in seconds."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tests.tiny_models import llama_config

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    torch.manual_seed(0)
    cfg = llama_config(64, 128, 2, 4, kv_heads=2, vocab=len(tokenizer), max_positions=512)
    folder = tmp_path_factory.mktemp("tiny-lm")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
