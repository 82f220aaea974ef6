"""The demo's shortcut: the evaluation tokens come from a prefix of the file, not the whole file."""

from __future__ import annotations

import pytest
import torch

from leanformers.data import load_text, tokenize_text
from leanformers.demo import _head_ids


@pytest.mark.parametrize("name", ["tinyshakespeare.txt", "wikitext-2-raw-test.txt"])
def test_head_ids_equal_the_start_of_the_whole_file_tokenisation(name, shared_data, smollm2_path, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    # 200 kB of the real text keeps the test short; the demo takes the first 16k tokens of ~300k.
    text = load_text(shared_data / name)[:200_000]
    path = tmp_path / name
    path.write_text(text)
    whole = tokenize_text(text, tokenizer)
    for n in (1000, 4096):
        assert torch.equal(_head_ids(path, tokenizer, n), whole[:n])
    # More tokens than the text holds: all of it.
    assert torch.equal(_head_ids(path, tokenizer, whole.numel() + 10), whole)


def test_demo_calibrates_on_the_cli_default_which_reads_no_other_package():
    """The demo uses mpifa-compress's default --calib as is: readable offline, no dataset, and no
    python:<module> of another package (issue 19 #14: its files change with that package's version)."""
    from leanformers.compression.options import DEFAULT_CALIBRATION
    from leanformers.data import check_sources, parse_sources
    from leanformers.demo import default_calibration

    assert default_calibration() == DEFAULT_CALIBRATION
    check_sources(DEFAULT_CALIBRATION)
    for source, _ in parse_sources(DEFAULT_CALIBRATION):
        assert source == "self" or source == "python:leanformers", source


def test_empty_or_degenerate_answers_are_shown_as_quality_findings():
    from leanformers.demo import shown

    assert shown("The capital of France is Paris.") == "'The capital of France is Paris.'"
    assert shown("") == "(quality finding: empty answer (the model ended its turn at once)) ''"
    assert shown("France France France France").startswith("(quality finding: degenerate answer")


def test_generate_answers_through_the_chat_template_without_echoing_the_prompt(smollm2_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from leanformers.demo import PROMPTS, generate
    from tests.tiny_models import llama_config

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    assert tokenizer.chat_template  # the instruct model's template is the path the demo takes
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(32, 64, 1, 2, kv_heads=1, vocab=len(tokenizer))).eval()
    answers = generate(model, tokenizer, PROMPTS, max_new_tokens=5)
    assert len(answers) == len(PROMPTS) and answers == generate(model, tokenizer, PROMPTS, max_new_tokens=5)
    for prompt, answer in zip(PROMPTS, answers):
        assert prompt not in answer and "<|im_start|>" not in answer  # only the new tokens, decoded
