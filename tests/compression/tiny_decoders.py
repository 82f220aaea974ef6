"""Tiny decoders that are NOT in MPIFA's layout table, built from config (random weights, seconds).

Each has its own block structure: Gemma 3 (q/k norms, sandwich norms, sliding window, gelu-tanh MLP),
Phi-3 (fused qkv_proj and gate_up_proj), OLMo 2 (q/k norms on the full projections, post-norms),
a Llama-3-style model (llama3 RoPE scaling, tied embeddings, GQA; model_type "llama", so it takes the
table's fast path, which test_layout checks against inference) and Qwen 3 (q/k norms, explicit head_dim).
"""

from __future__ import annotations

import torch

VOCAB = 128
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _build(config_cls, model_cls, seed: int, vocab: int, **extra):
    torch.manual_seed(seed)
    config = config_cls(vocab_size=vocab, **{**COMMON, **extra})
    return model_cls(config).eval()


def tiny_gemma3(seed: int = 0, vocab: int = VOCAB):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return _build(Gemma3TextConfig, Gemma3ForCausalLM, seed, vocab, head_dim=16, sliding_window=32)


def tiny_phi3(seed: int = 0, vocab: int = VOCAB):
    from transformers import Phi3Config, Phi3ForCausalLM

    return _build(Phi3Config, Phi3ForCausalLM, seed, vocab, pad_token_id=0)


def tiny_olmo2(seed: int = 0, vocab: int = VOCAB):
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return _build(Olmo2Config, Olmo2ForCausalLM, seed, vocab, pad_token_id=0)


def tiny_llama3(seed: int = 0, vocab: int = VOCAB):
    """Llama-3-style: llama3 RoPE scaling (500k theta, factor 8), tied embeddings, GQA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _build(
        LlamaConfig,
        LlamaForCausalLM,
        seed,
        vocab,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    return model


def tiny_qwen3(seed: int = 0, vocab: int = VOCAB):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _build(Qwen3Config, Qwen3ForCausalLM, seed, vocab, head_dim=16)


DECODERS = {
    "gemma3_text": tiny_gemma3,
    "phi3": tiny_phi3,
    "olmo2": tiny_olmo2,
    "llama3": tiny_llama3,
    "qwen3": tiny_qwen3,
}
