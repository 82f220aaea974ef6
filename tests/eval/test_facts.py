"""The factual-answer check (issue 20 target 3, issue 19 #15): the question set, answer matching, the
kept share, and naming empty / degenerate answers."""

from __future__ import annotations

import pytest

from leanformers.eval.facts import FACTS, _prompt_ids, answer_finding, fact_check, greedy_answers, is_correct


def test_the_set_has_twenty_or_more_distinct_questions_each_with_an_answer():
    assert len(FACTS) >= 20
    assert len({q for q, _ in FACTS}) == len(FACTS)
    assert all(q.endswith("?") and answers and all(a.strip() for a in answers) for q, answers in FACTS)


def test_an_answer_is_correct_when_it_contains_an_accepted_form_as_a_word():
    assert is_correct("Paris.", ("Paris",)) and is_correct("The capital of France is paris!", ("Paris",))
    assert not is_correct("Parisian cafes", ("Paris",))  # a whole word, not a prefix
    assert is_correct("A spider has 8 legs.", ("eight", "8")) and not is_correct("18 legs", ("eight", "8"))
    assert is_correct("It is H2O", ("H2O",)) and not is_correct("", ("Paris",))


def test_kept_share_counts_only_what_the_dense_model_knew():
    facts = FACTS[:4]
    dense = ["Paris", "Tokyo", "Naples", "Berlin"]  # 3 correct
    compressed = ["Paris", "Kyoto", "Rome", "Berlin"]  # keeps 2 of those 3; Rome does not count
    check = fact_check(dense, compressed, facts)
    assert (check.kept, sum(check.dense_correct)) == (2, 3)
    assert check.share == pytest.approx(2 / 3) and not check.passed
    assert "2 of the 3" in check.summary() and "NOT met" in check.summary()
    assert fact_check(dense, dense, facts).passed
    with pytest.raises(ValueError, match="one dense and one compressed answer per question"):
        fact_check(dense, compressed[:3], facts)


def test_empty_and_degenerate_answers_are_named():
    assert answer_finding("") == "empty answer (the model ended its turn at once)"
    assert "no words" in answer_finding("...!?")
    assert "repeated 5 times" in answer_finding("the the the the the end")
    assert "distinct words" in answer_finding("a b c a b c a b c a b c")
    assert answer_finding("The capital of France is Paris.") is None
    assert answer_finding("Paris") is None


@pytest.mark.integration
def test_dense_smollm2_knows_the_demo_question_and_keeps_all_its_own_answers(smollm2_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    facts = FACTS[:3]
    answers = greedy_answers(model, tok, [q for q, _ in facts], max_new_tokens=12)
    assert is_correct(answers[0], ("Paris",)), answers[0]
    assert answers == greedy_answers(model, tok, [q for q, _ in facts], max_new_tokens=12)  # greedy
    assert fact_check(answers, answers, facts).share == 1.0
    # prompts of different lengths answered together (left-padded, masked) as one at a time, unpadded
    prompts = [FACTS[0][0], FACTS[18][0], FACTS[7][0]]
    lengths = {len(_prompt_ids(tok, p)) for p in prompts}
    assert len(lengths) == 3  # the batch is padded
    together = greedy_answers(model, tok, prompts, max_new_tokens=12)
    assert together == greedy_answers(model, tok, prompts, max_new_tokens=12, batch_size=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        greedy_answers(model, tok, ["?"], batch_size=0)


@pytest.mark.integration
def test_a_tokenizer_without_pad_or_eos_still_answers_a_padded_batch(smollm2_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    prompts = [FACTS[0][0], FACTS[18][0]]
    want = greedy_answers(model, tok, prompts, max_new_tokens=8)
    tok.pad_token, tok.eos_token = None, None
    assert tok.pad_token_id is None and tok.eos_token_id is None
    assert len({len(_prompt_ids(tok, p)) for p in prompts}) == 2  # the batch is padded
    assert greedy_answers(model, tok, prompts, max_new_tokens=8) == want  # the masked pad id does not matter
