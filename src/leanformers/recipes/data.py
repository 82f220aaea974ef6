"""Data of a recipe: text sources, tokenizers, causal-LM token blocks.

``data.train`` / ``data.eval`` name a file, a folder, a ``datasets`` name, ``shared:NAME`` (a file of
../shared/data) or ``stdlib:train`` / ``stdlib:eval`` (Python standard-library source).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from leanformers.recipes.loading import check_keys

__all__ = [
    "ByteTokenizer",
    "PackedBlocks",
    "build_dataset",
    "build_tokenizer",
    "load_source",
    "source_path",
]


def source_path(source: str) -> Path:
    """A data file: a path, or ``shared:NAME`` (a file of ../shared/data); raise when it does not exist."""
    from leanformers.data import shared_data_path

    source = str(source)
    path = shared_data_path(source.removeprefix("shared:")) if source.startswith("shared:") else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    return path


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256): a dependency-free tokenizer for tiny CPU recipes."""

    vocab_size = 256

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = False):
        return {"input_ids": list(text.encode("utf-8"))}

    def save_pretrained(self, folder) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "byte_tokenizer.json").write_text(
            json.dumps({"type": "utf-8 bytes", "vocab_size": 256})
        )


def build_tokenizer(spec: str | dict | None):
    """``bytes`` (default), ``smollm2``, a path or Hub id, or ``{bpe: {files: [...], vocab_size: N,
    min_frequency: 2}, cache_dir: null}``: a byte-level BPE trained on the files with ``tokenizers``
    (cached by content, see :func:`leanformers.data.tokenizer.bpe_tokenizer`)."""
    if isinstance(spec, dict):
        from leanformers.data.tokenizer import bpe_tokenizer

        check_keys(spec, ("bpe", "cache_dir"), "tokenizer keys")
        options = dict(spec.get("bpe") or {})
        check_keys(options, ("files", "vocab_size", "min_frequency"), "tokenizer.bpe keys")
        if not options.get("files"):
            raise ValueError(
                "tokenizer.bpe needs files: [training text files], e.g. both sides of the train split"
            )
        files = [source_path(f) for f in options.pop("files")]
        return bpe_tokenizer(files, cache_dir=spec.get("cache_dir"), **options)
    if spec is None or spec == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    if spec == "smollm2":
        from leanformers.hub import smollm2_135m

        spec = str(smollm2_135m())
    return AutoTokenizer.from_pretrained(spec)


class PackedBlocks(torch.utils.data.Dataset):
    """(n, block_size) token blocks as causal-LM examples (labels = input_ids)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def _pack(ids: torch.Tensor, block_size: int) -> torch.Tensor:
    n = ids.numel() // block_size
    if n == 0:
        raise ValueError(f"the data has {ids.numel()} tokens, fewer than one block of {block_size}")
    return ids[: n * block_size].view(n, block_size)


def _stdlib_text(split: str) -> str:
    """Python standard-library source as a corpus: 1 file in 20 (by a hash of its path) is ``eval``."""
    import hashlib
    import sysconfig

    if split not in ("train", "eval"):
        raise ValueError(f"stdlib source split must be 'train' or 'eval', got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    chosen = []
    for path in files:
        held_out = int(hashlib.sha256(str(path.relative_to(root)).encode()).hexdigest(), 16) % 20 == 0
        if held_out == (split == "eval"):
            chosen.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(chosen)


def load_source(source: str, text_field: str = "text") -> str:
    """Text of a data source: a file/folder/datasets name (see leanformers.data.load_text),
    ``shared:NAME`` (a file of ../shared/data) or ``stdlib:train`` / ``stdlib:eval`` (Python source)."""
    from leanformers.data import load_text, shared_data_path

    source = str(source)
    if source.startswith("shared:"):
        return load_text(shared_data_path(source.removeprefix("shared:")), text_field=text_field)
    if source.startswith("stdlib:"):
        return _stdlib_text(source.removeprefix("stdlib:"))
    return load_text(source, text_field=text_field)


def build_dataset(spec: dict, tokenizer) -> tuple[PackedBlocks, PackedBlocks | None]:
    """Tokenise and pack ``data.train`` (and ``data.eval`` or a held-out tail) into blocks."""
    from leanformers.data import tokenize_text

    if "train" not in spec:
        raise ValueError("data needs a 'train' source (a file, a folder or a datasets name)")
    block_size = int(spec.get("block_size", 256))
    text_field = spec.get("text_field", "text")
    ids = tokenize_text(load_source(spec["train"], text_field), tokenizer)
    if spec.get("max_train_tokens"):
        ids = ids[: int(spec["max_train_tokens"])]
    eval_ds = None
    if spec.get("eval"):
        eval_ids = tokenize_text(load_source(spec["eval"], text_field), tokenizer)
        if spec.get("max_eval_tokens"):
            eval_ids = eval_ids[: int(spec["max_eval_tokens"])]
        eval_ds = PackedBlocks(_pack(eval_ids, block_size))
    elif spec.get("eval_fraction"):
        cut = int(ids.numel() * (1 - float(spec["eval_fraction"])))
        ids, eval_ids = ids[:cut], ids[cut:]
        eval_ds = PackedBlocks(_pack(eval_ids, block_size))
    return PackedBlocks(_pack(ids, block_size)), eval_ds
