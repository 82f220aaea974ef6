"""A byte-level BPE tokenizer trained with ``tokenizers`` on a corpus, cached by content.

Translation recipes train their own subword vocabulary on the training split (as MT papers do)
instead of borrowing an LLM's. The result is a ``transformers.PreTrainedTokenizerFast`` with
``<pad>`` (0), ``</s>`` (1) and ``<unk>`` (2); it adds no special tokens by itself (the translation
dataset appends ``</s>``). Byte-level pre-tokenisation means no input is ever unknown and decoding
returns the exact text.

The trained tokenizer is cached under ``<cache_dir>/tokenizers/<key>/`` where ``key`` hashes the
training files' bytes, the options and the ``tokenizers`` version: a changed corpus or option trains
a new one, never reuses a stale one. The folder is written to a temporary name and renamed into
place, so a stopped run never leaves a half-written cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["SPECIAL_TOKENS", "bpe_tokenizer", "tokenizer_cache_key"]

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def tokenizer_cache_key(files: Sequence[Path], vocab_size: int, min_frequency: int) -> str:
    """sha256 (first 16 hex) of the files' bytes, their order, the options and the tokenizers version."""
    import tokenizers

    digest = hashlib.sha256()
    meta = {
        "kind": "byte-level-bpe",
        "vocab_size": vocab_size,
        "min_frequency": min_frequency,
        "special": SPECIAL_TOKENS,
        "tokenizers": tokenizers.__version__,
    }
    digest.update(json.dumps(meta, sort_keys=True).encode())
    for path in files:
        digest.update(b"\0file\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _train(files: Sequence[Path], vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(p) for p in files], trainer)
    return tok


def bpe_tokenizer(
    files: Sequence[str | os.PathLike],
    vocab_size: int = 8000,
    min_frequency: int = 2,
    cache_dir: str | os.PathLike | None = None,
):
    """A byte-level BPE tokenizer trained on ``files`` (one sentence a line), cached by content.

    Args:
        files: training text files (e.g. both sides of a parallel corpus: a joint vocabulary).
        vocab_size: target vocabulary size, special tokens included (>= 256 + 3).
        min_frequency: pairs seen fewer times are not merged.
        cache_dir: cache root (default :func:`leanformers.hub.cache_dir`, i.e. ``LEANFORMERS_CACHE``
            or ``~/.cache/leanformers``); the tokenizer lives in ``<cache_dir>/tokenizers/<key>/``.

    Returns:
        a ``PreTrainedTokenizerFast`` (``pad_token_id`` 0, ``eos_token_id`` 1, ``unk_token_id`` 2).
    """
    from transformers import PreTrainedTokenizerFast

    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("tokenizer.bpe.files is empty: give the training text files")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer training file {path} does not exist")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is below the 256 byte symbols + {len(SPECIAL_TOKENS)} specials"
        )
    if cache_dir is None:
        from leanformers.hub import cache_dir as default_cache

        cache_dir = default_cache()
    root = Path(cache_dir) / "tokenizers"
    target = root / tokenizer_cache_key(paths, vocab_size, min_frequency)
    if not (target / "tokenizer.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        try:
            fast = PreTrainedTokenizerFast(
                tokenizer_object=_train(paths, vocab_size, min_frequency),
                pad_token="<pad>",
                eos_token="</s>",
                unk_token="<unk>",
            )
            fast.save_pretrained(str(tmp))
            (tmp / "leanformers_tokenizer.json").write_text(
                json.dumps(
                    {
                        "files": [str(p) for p in paths],
                        "vocab_size": vocab_size,
                        "min_frequency": min_frequency,
                    },
                    indent=2,
                )
            )
            try:
                tmp.rename(target)
            except OSError:
                if not (target / "tokenizer.json").is_file():  # not a concurrent writer's finished copy
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(str(target))
