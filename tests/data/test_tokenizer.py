"""leanformers.data.tokenizer: a byte-level BPE trained with ``tokenizers``, cached by content."""

from __future__ import annotations

import pytest

from leanformers.data import tokenizer as bpe

LINES = [
    "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.",
    "Zwei junge Männer stehen draußen im Garten.",
    "A little girl climbs into a wooden playhouse.",
    "Two dogs are playing in the snow.",
] * 50


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


def test_specials_and_exact_round_trip(corpus, tmp_path):
    tok = bpe.bpe_tokenizer([corpus], vocab_size=300, cache_dir=tmp_path / "cache")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) <= 300
    # byte level: text never seen (other script, emoji) still encodes without <unk> and decodes exactly
    for text in ["Zwei Männer stehen draußen.", "Ça coûte 5 € — 東京 🙂"]:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids and tok.eos_token_id not in ids  # no specials added
        assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    # it learned merges from the corpus: a frequent word is fewer tokens than bytes
    assert len(tok("Männer")["input_ids"]) < len("Männer".encode())


def test_cache_is_reused_and_keyed_by_content_and_options(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    bpe.bpe_tokenizer([corpus], vocab_size=300, cache_dir=cache)
    entries = sorted(p.name for p in (cache / "tokenizers").iterdir())
    assert len(entries) == 1 and not entries[0].startswith(".")  # no temporary folder left behind

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache holds this tokenizer")

    monkeypatch.setattr(bpe, "_train", no_training)
    bpe.bpe_tokenizer([corpus], vocab_size=300, cache_dir=cache)  # a cache hit
    key = bpe.tokenizer_cache_key([corpus], 300, 2)
    assert key == entries[0]
    assert bpe.tokenizer_cache_key([corpus], 301, 2) != key
    corpus.write_text("other text\n" * 10, encoding="utf-8")
    assert bpe.tokenizer_cache_key([corpus], 300, 2) != key  # a changed corpus never hits a stale entry
    with pytest.raises(AssertionError, match="retrained"):
        bpe.bpe_tokenizer([corpus], vocab_size=300, cache_dir=cache)


def test_a_failed_training_leaves_no_cache_entry(corpus, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("stopped")

    monkeypatch.setattr(bpe, "_train", broken)
    with pytest.raises(RuntimeError, match="stopped"):
        bpe.bpe_tokenizer([corpus], vocab_size=300, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "tokenizers").iterdir()) == []


def test_errors_name_the_problem(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        bpe.bpe_tokenizer([tmp_path / "missing.txt"], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="below the 256 byte symbols"):
        bpe.bpe_tokenizer([corpus], vocab_size=200, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="files is empty"):
        bpe.bpe_tokenizer([], cache_dir=tmp_path)
