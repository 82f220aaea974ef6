"""Tiny models built from config (no Hub): one per architecture family the package supports."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128


def llama_config(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int | None = None,
    vocab: int = VOCAB,
    max_positions: int = 256,
    **extra,
) -> LlamaConfig:
    """The one LLaMA config factory of tests and bench (``extra``: other LlamaConfig fields)."""
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        **extra,
    )


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 96) -> LlamaForCausalLM:
    """LLaMA with grouped-query attention (4 query heads, 2 key/value heads)."""
    torch.manual_seed(seed)
    cfg = llama_config(hidden, intermediate, layers, heads=4, kv_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0, layers: int = 2) -> Qwen2ForCausalLM:
    """Qwen2: GQA with q/k/v biases."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero biases so that dropping them would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def tiny_opt(seed: int = 0, layers: int = 2) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return OPTForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, layers: int = 2) -> GPT2LMHeadModel:
    """GPT-2: Conv1D layers (weight stored transposed)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=layers,
        n_head=4,
        n_positions=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_config(layers: int = 2, **extra) -> BertConfig:
    """BERT hidden 64, FFN 128, 4 heads, no dropout (``extra``: other BertConfig fields)."""
    fields = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    return BertConfig(**{**fields, **extra})


def tiny_bert(seed: int = 0, layers: int = 2) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(tiny_bert_config(layers)).eval()


ALL_CAUSAL = {"llama": tiny_llama, "qwen2": tiny_qwen2, "opt": tiny_opt, "gpt2": tiny_gpt2}


def random_ids(batch: int = 2, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def tiny_bert_cls(seed: int = 0, layers: int = 2, num_labels: int = 3):
    """BERT with a sequence-classification head (pooler + classifier); the head is what fine-tuning trains."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_bart(seed: int = 0, layers: int = 2):
    """BART encoder-decoder (seq2seq LM head tied to the shared embedding), no dropout."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    cfg = BartConfig(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        max_position_embeddings=256,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(cfg).eval()
