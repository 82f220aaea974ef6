"""Datasets of the supervised tasks: translation (aligned line files) and classification (tables)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from leanformers.recipes.data import source_path

__all__ = ["Examples", "build_classification_dataset", "build_translation_dataset"]


def _lines(source: str) -> list[str]:
    """Lines of a text file (aligned corpora: one sentence a line, blank lines kept for alignment)."""
    return source_path(source).read_text(encoding="utf-8").splitlines()


class Examples(torch.utils.data.Dataset):
    """Tokenised examples (dicts of id lists) for a padding data collator."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    # causal-LM tokenisers (e.g. SmolLM2's) add no EOS; a seq2seq model must learn to stop
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def build_translation_dataset(spec: dict, tokenizer) -> tuple[Examples, Examples, list[str]]:
    """``data.train`` / ``data.eval`` = ``{source: file, target: file}`` of aligned lines.

    Returns (train, eval, raw eval targets, the BLEU/chrF references).
    """
    max_src = int(spec.get("max_source_length", 128))
    max_tgt = int(spec.get("max_target_length", 128))
    eos = tokenizer.eos_token_id

    def split(name: str, limit_key: str) -> tuple[Examples, list[str]]:
        part = spec.get(name)
        if not isinstance(part, dict) or not {"source", "target"} <= set(part):
            raise ValueError(f"data.{name} of a translation recipe must be {{source: file, target: file}}")
        src, tgt = _lines(part["source"]), _lines(part["target"])
        if len(src) != len(tgt):
            raise ValueError(f"data.{name}: {len(src)} source lines but {len(tgt)} target lines")
        pairs = [(a.strip(), b.strip()) for a, b in zip(src, tgt) if a.strip() and b.strip()]
        if spec.get(limit_key):
            pairs = pairs[: int(spec[limit_key])]
        rows = []
        for a, b in pairs:
            ids = tokenizer(a, truncation=True, max_length=max_src - 1)["input_ids"]
            labels = tokenizer(text_target=b, truncation=True, max_length=max_tgt - 1)["input_ids"]
            rows.append({"input_ids": _with_eos(ids, eos), "labels": _with_eos(labels, eos)})
        return Examples(rows), [b for _, b in pairs]

    train, _ = split("train", "max_train_examples")
    evaluation, references = split("eval", "max_eval_examples")
    return train, evaluation, references


def _table_rows(path: Path) -> list[dict]:
    import csv

    if path.suffix in (".jsonl", ".json"):
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    delimiter = "\t" if path.suffix in (".tsv", ".tab") else ","
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE))


def build_classification_dataset(spec: dict, tokenizer) -> tuple[Examples, Examples, list]:
    """Rows of a TSV/CSV/JSONL file (``text_field``, ``label_field``) split into train / eval.

    ``data.eval`` names a separate file; otherwise ``eval_fraction`` of the rows, after a shuffle
    with ``seed``, is held out. Returns (train, eval, label names in id order).
    """
    import random

    text_field, label_field = spec.get("text_field", "text"), spec.get("label_field", "label")
    max_length = int(spec.get("max_length", 128))

    def read(source: str) -> list[dict]:
        rows = _table_rows(source_path(source))
        for key in (text_field, label_field):
            if rows and key not in rows[0]:
                raise ValueError(f"{source} has no column {key!r} (columns: {sorted(rows[0])})")
        return rows

    if "train" not in spec:
        raise ValueError("data needs a 'train' file")
    train_rows = read(spec["train"])
    if spec.get("eval"):
        eval_rows = read(spec["eval"])
    else:
        fraction = float(spec.get("eval_fraction", 0.2))
        random.Random(int(spec.get("seed", 0))).shuffle(train_rows)
        cut = len(train_rows) - max(1, int(len(train_rows) * fraction))
        train_rows, eval_rows = train_rows[:cut], train_rows[cut:]
    if spec.get("max_train_examples"):
        train_rows = train_rows[: int(spec["max_train_examples"])]
    if spec.get("max_eval_examples"):
        eval_rows = eval_rows[: int(spec["max_eval_examples"])]
    labels = sorted({str(r[label_field]) for r in train_rows + eval_rows})
    index = {name: i for i, name in enumerate(labels)}

    def encode(rows: list[dict]) -> Examples:
        out = []
        for r in rows:
            enc = tokenizer(str(r[text_field]).strip(), truncation=True, max_length=max_length)
            out.append({"input_ids": enc["input_ids"], "labels": index[str(r[label_field])]})
        return Examples(out)

    return encode(train_rows), encode(eval_rows), labels
