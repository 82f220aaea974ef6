import math

import pytest
import torch
import torch.nn.functional as F

from leanformers.eval import perplexity
from tests.tiny_models import VOCAB, tiny_llama


def test_perplexity_matches_manual_token_accounting():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (330,), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, text=ids, seqlen=64, batch_size=2, progress=False)
    assert res.n_windows == 5 and res.n_tokens == 5 * 63
    nll = 0.0
    with torch.no_grad():
        for w in ids[:320].view(5, 64):
            logits = model(input_ids=w[None]).logits[0]
            nll += F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
    assert res.ppl == pytest.approx(math.exp(nll / (5 * 63)), rel=1e-5)
    # batching does not change the result
    assert perplexity(model, text=ids, seqlen=64, batch_size=5, progress=False).ppl == pytest.approx(
        res.ppl, rel=1e-5
    )


def test_perplexity_needs_text_and_tokenizer():
    model = tiny_llama()
    with pytest.raises(ValueError, match="pass the evaluation text"):
        perplexity(model, seqlen=8)
    with pytest.raises(ValueError, match="tokenizer is needed"):
        perplexity(model, text="some words", seqlen=8)
