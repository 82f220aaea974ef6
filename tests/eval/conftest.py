"""Tiny LLaMAs with the real SmolLM2 tokenizer (so lm-eval's prompts tokenise as usual), as folders."""

from __future__ import annotations

import pytest
import torch


def tiny_lm(vocab: int, seed: int = 0):
    from transformers import LlamaForCausalLM

    from tests.tiny_models import llama_config

    torch.manual_seed(seed)
    cfg = llama_config(64, 96, 2, 4, kv_heads=2, vocab=vocab, max_positions=1024, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def dense_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-dense")
    tiny_lm(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def mpifa_folder(tmp_path_factory, tokenizer):
    """A tiny LLaMA compressed by mpifa_compress (density 0.6, PIFA layers) and saved."""
    import leanformers

    model = tiny_lm(len(tokenizer), seed=1)
    calib = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = leanformers.MPIFAConfig(density=0.6, nsamples=4, seqlen=32, device="cpu")
    leanformers.mpifa_compress(model, tokenizer, cfg, calibration=calib, progress=False)
    folder = tmp_path_factory.mktemp("tiny-mpifa") / "out"
    leanformers.save_compressed(model, tokenizer, folder, model.config.quantization_config)
    return folder
