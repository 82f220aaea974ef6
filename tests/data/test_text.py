import json

import pytest
import torch

from leanformers.data import calibration_windows, evaluation_windows, load_text, tokenize_text


def test_txt_rows_are_joined_like_wikitext(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first row\n\n second row \nthird\n")
    assert load_text(f) == "first row\n\n second row \n\nthird"
    assert load_text(f, join=None) == "first row\n\n second row \nthird\n"


def test_json_jsonl_parquet_and_folder(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "alpha"}, {"text": "beta"}]))
    (tmp_path / "b.jsonl").write_text('{"text": "gamma"}\n{"text": "delta"}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["eps", "zeta"]}), tmp_path / "c.parquet")
    assert load_text(tmp_path / "a.json") == "alpha\n\nbeta"
    assert load_text(tmp_path / "b.jsonl") == "gamma\n\ndelta"
    assert load_text(tmp_path / "c.parquet") == "eps\n\nzeta"
    assert load_text(tmp_path) == "alpha\n\nbeta\n\ngamma\n\ndelta\n\neps\n\nzeta"


def test_missing_file_and_unknown_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="could not load dataset 'surely-not-a-dataset-xyz'"):
        load_text("surely-not-a-dataset-xyz")


def test_calibration_windows_are_seeded_and_checked():
    ids = torch.arange(1000)
    a = calibration_windows(ids, 4, 100, seed=1)
    b = calibration_windows(ids, 4, 100, seed=1)
    assert a.shape == (4, 100) and torch.equal(a, b)
    # each window is a contiguous slice of the corpus
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 99, dtype=torch.long))
    assert not torch.equal(a, calibration_windows(ids, 4, 100, seed=2))
    with pytest.raises(
        ValueError, match="too few calibration tokens: the text has 1,000 tokens but 11 x 100"
    ):
        calibration_windows(ids, 11, 100)


def test_evaluation_windows_are_non_overlapping():
    w = evaluation_windows(torch.arange(1050), 100)
    assert w.shape == (10, 100) and torch.equal(w.reshape(-1), torch.arange(1000))
    assert evaluation_windows(torch.arange(1050), 100, max_tokens=300).shape == (3, 100)
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluation_windows(torch.arange(10), 100)


def test_tokenize_real_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    ids = tokenize_text("hello world " * 400, tok)  # longer than model_max_length: no truncation
    assert ids.dim() == 1 and ids.numel() == 800
