"""Do facts survive compression? Short factual questions, greedy answers through the chat template, and
the share of the dense model's correct answers the compressed model still gets right (issue 20).

The question set was written and committed before any compression setting was tuned, and nothing is
tuned on it: it is a check, not a target to fit. An answer is correct when it contains one of the
accepted forms as a whole word (case-insensitive): "Paris." and "The capital of France is Paris" both
are. ``answer_finding`` names an empty or degenerate answer, so that a demo reports it as a quality
finding instead of quoting nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = [
    "FACTS",
    "FactCheck",
    "answer_finding",
    "fact_check",
    "greedy_answers",
    "is_correct",
]

# (question, accepted answers): common knowledge, one short answer each.
FACTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of the United Kingdom?", ("London",)),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("How many days are in a week?", ("seven", "7")),
    ("How many months are in a year?", ("twelve", "12")),
    ("How many hours are in a day?", ("twenty-four", "24")),
    ("How many legs does a spider have?", ("eight", "8")),
    ("How many continents are there on Earth?", ("seven", "7")),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("Which planet do we live on?", ("Earth",)),
    ("What is the star at the center of our solar system called?", ("Sun",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("At how many degrees Celsius does water boil at sea level?", ("100", "one hundred")),
    ("What gas do plants take in from the air to make their food?", ("carbon dioxide", "CO2")),
    ("What is the chemical formula of water?", ("H2O",)),
    ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    ("Who wrote the play Romeo and Juliet?", ("Shakespeare",)),
    ("In which country are the pyramids of Giza?", ("Egypt",)),
    ("What language is mainly spoken in Brazil?", ("Portuguese",)),
    ("What is the currency of Japan?", ("yen",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is two plus two?", ("four", "4")),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("What do bees make?", ("honey",)),
)


def is_correct(answer: str, accepted: tuple[str, ...]) -> bool:
    """Whether ``answer`` contains one of the ``accepted`` forms as a whole word (case-insensitive)."""
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", answer, re.IGNORECASE) for a in accepted)


def answer_finding(answer: str) -> str | None:
    """What is wrong with an answer as an answer, or None: empty (the model ended its turn at once), no
    letters or digits, or degenerate (a word repeated 4+ times in a row, or at most a third of 9+ words
    distinct)."""
    text = answer.strip()
    if not text:
        return "empty answer (the model ended its turn at once)"
    if not re.search(r"\w", text):
        return f"no words, only {text[:20]!r}"
    words = re.findall(r"\w+", text.lower())
    run = longest = 1
    for a, b in zip(words, words[1:]):
        run = run + 1 if a == b else 1
        longest = max(longest, run)
    if longest >= 4:
        return f"degenerate answer (a word repeated {longest} times in a row)"
    if len(words) >= 9 and len(set(words)) * 3 <= len(words):
        return f"degenerate answer ({len(set(words))} distinct words of {len(words)})"
    return None


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


@torch.no_grad()
def greedy_answers(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 24, batch_size: int = 32
) -> list[str]:
    """Greedy answers to ``prompts``, through the chat template when the tokenizer has one (else the
    plain prompt); only the new tokens, decoded without special tokens.

    Up to ``batch_size`` prompts are answered together, left-padded with an attention mask (a CPU step
    costs about the same for one prompt as for thirty: it is mostly reading the weights). Padding can
    change the last bits of a logit and so, at a near tie, a greedy token: ``batch_size=1`` answers one
    prompt at a time, unpadded.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    # without pad and EOS any id pads: the attention mask hides the padded positions
    answers = []
    for start in range(0, len(prompts), batch_size):
        rows = [_prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return answers


@dataclass
class FactCheck:
    """The result of ``fact_check``: per question, the dense and compressed answers and their correctness."""

    questions: list[str]
    dense: list[str]
    compressed: list[str]
    dense_correct: list[bool]
    compressed_correct: list[bool]
    target: float = 0.8

    @property
    def kept(self) -> int:
        """Questions both models answer correctly."""
        return sum(d and c for d, c in zip(self.dense_correct, self.compressed_correct))

    @property
    def share(self) -> float:
        """kept / the dense model's correct answers (1.0 when the dense model knows none)."""
        known = sum(self.dense_correct)
        return self.kept / known if known else 1.0

    @property
    def passed(self) -> bool:
        return self.share >= self.target

    def summary(self) -> str:
        known = sum(self.dense_correct)
        verdict = "met" if self.passed else "NOT met"
        return (
            f"factual answers: the compressed model answers {self.kept} of the {known} questions the dense "
            f"model answers correctly ({self.share:.0%}; target >= {self.target:.0%}: {verdict}); dense "
            f"{known}/{len(self.questions)}, compressed {sum(self.compressed_correct)}/{len(self.questions)}"
        )

    def to_dict(self) -> dict:
        rows = zip(self.questions, self.dense, self.compressed, self.dense_correct, self.compressed_correct)
        return {
            "kept": self.kept,
            "dense_correct": sum(self.dense_correct),
            "share": self.share,
            "target": self.target,
            "passed": self.passed,
            "answers": [
                dict(question=q, dense=d, compressed=c, dense_ok=a, compressed_ok=b) for q, d, c, a, b in rows
            ],
        }


def fact_check(
    dense_answers: list[str],
    compressed_answers: list[str],
    facts: tuple[tuple[str, tuple[str, ...]], ...] = FACTS,
    target: float = 0.8,
) -> FactCheck:
    """Score the two models' answers to ``facts`` (in order; from ``greedy_answers``)."""
    if not (len(dense_answers) == len(compressed_answers) == len(facts)):
        raise ValueError(
            f"one dense and one compressed answer per question: got {len(dense_answers)} and "
            f"{len(compressed_answers)} answers for {len(facts)} questions"
        )
    questions = [q for q, _ in facts]
    dense_ok = [is_correct(a, acc) for a, (_, acc) in zip(dense_answers, facts)]
    comp_ok = [is_correct(a, acc) for a, (_, acc) in zip(compressed_answers, facts)]
    return FactCheck(questions, list(dense_answers), list(compressed_answers), dense_ok, comp_ok, target)
