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


def test_code_files_are_read_verbatim_and_other_suffixes_as_text(tmp_path):
    code = "def f(x):\n\n    return x\n"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(code)
    (tmp_path / "pkg" / "notes.bin").write_bytes(b"\xff\xfe\x00")  # not listed: a folder skips it
    assert load_text(tmp_path / "pkg" / "m.py") == code  # blank lines and indentation kept
    assert load_text(tmp_path / "pkg") == code
    (tmp_path / "train.en").write_text("a caption\n\nanother\n")  # Multi30k-style name
    assert load_text(tmp_path / "train.en") == "a caption\n\nanother"
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_text(tmp_path / "pkg" / "notes.bin")


def test_parse_sources_and_its_errors():
    from leanformers.data import parse_sources

    assert parse_sources("a.txt=2,code/=0.5,b.jsonl") == [("a.txt", 2.0), ("code/", 0.5), ("b.jsonl", 1.0)]
    assert parse_sources("wikitext:wikitext-2-raw-v1@train") == [("wikitext:wikitext-2-raw-v1@train", 1.0)]
    with pytest.raises(ValueError, match="is not a number"):
        parse_sources("a.txt=lots")
    with pytest.raises(ValueError, match="must be a positive number"):
        parse_sources("a.txt=0")
    with pytest.raises(ValueError, match="empty source"):
        parse_sources("a.txt,,b.txt")


def test_mixed_windows_follow_the_weights_and_come_from_their_source():
    from leanformers.data import mixed_calibration_windows

    a, b, c = torch.arange(0, 5000), torch.arange(10_000, 12_000), torch.arange(20_000, 23_000)
    w = mixed_calibration_windows([(a, 2.0), (b, 1.0), (c, 1.0)], 10, 50, seed=3)
    assert w.shape == (10, 50)
    origin = (w[:, 0] // 10_000).tolist()
    assert origin == [0] * 5 + [1] * 3 + [2] * 2 or origin == [0] * 5 + [1] * 2 + [2] * 3  # 5 / 2.5 / 2.5
    for row in w:  # every window is a contiguous slice of one source
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 50))
    assert torch.equal(w, mixed_calibration_windows([(a, 2.0), (b, 1.0), (c, 1.0)], 10, 50, seed=3))
    with pytest.raises(ValueError, match="gets no window"):
        mixed_calibration_windows([(a, 100.0), (b, 1.0)], 10, 50)
    with pytest.raises(ValueError, match="too few calibration tokens"):
        mixed_calibration_windows([(a, 1.0), (b[:60], 1.0)], 10, 50)


def test_python_source_of_an_installed_module_or_package():
    import json as json_module
    from pathlib import Path

    text = load_text("python:json.decoder")  # a module: its one file, verbatim
    assert text == Path(json_module.decoder.__file__).read_text(encoding="utf-8")
    package = load_text("python:json")  # a package: every .py file under it, sorted
    assert text in package and Path(json_module.__file__).read_text(encoding="utf-8") in package
    with pytest.raises(ValueError, match="no installed module of that name"):
        load_text("python:surely_not_a_module_xyz")


def test_python_sources_are_found_without_importing_any_package(tmp_path, monkeypatch):
    """Issue 19 #12: calibrating on ``python:pkg.sub`` must not execute pkg/__init__.py (find_spec would)."""
    import sys

    from leanformers.data import load_text
    from leanformers.data.text import python_source_path

    pkg = tmp_path / "sidefx_pkg"
    (pkg / "sub").mkdir(parents=True)
    marker = tmp_path / "executed"
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (pkg / "sub" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (pkg / "sub" / "code.py").write_text("def f(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert python_source_path("sidefx_pkg.sub") == pkg / "sub"
    assert python_source_path("sidefx_pkg.sub.code") == pkg / "sub" / "code.py"
    assert "def f(x):" in load_text("python:sidefx_pkg.sub")
    assert not marker.exists() and "sidefx_pkg" not in sys.modules
    with pytest.raises(ValueError, match="sidefx_pkg.sub.code is a module, not a package"):
        python_source_path("sidefx_pkg.sub.code.x")
    with pytest.raises(ValueError, match="has no Python source file"):
        python_source_path("sys")


def test_files_that_are_not_utf8_are_refused_by_name(tmp_path):
    """Issue 19 #13: a latin-1 .json or .py is a clear error, never replacement characters."""
    from leanformers.data import load_text

    for name, body in (
        ("bad.json", '[{"text": "caf\xe9"}]'),
        ("bad.py", "x = 'caf\xe9'\n"),
        ("bad.txt", "caf\xe9\n"),
    ):
        (tmp_path / name).write_bytes(body.encode("latin-1"))
        with pytest.raises(ValueError, match=rf"{name} is not UTF-8 text \(byte \d+"):
            load_text(tmp_path / name)


def test_self_is_a_calibration_source_without_a_loader():
    """``self`` (text the compressed model generates) mixes like any source, is readable offline by
    check_sources, and is never sent to ``datasets`` as a dataset name."""
    from leanformers.data import check_sources, parse_sources
    from leanformers.data.text import window_counts

    check_sources("self")
    check_sources("self=2,python:json=1")
    assert parse_sources("self=2,wiki.txt=1") == [("self", 2.0), ("wiki.txt", 1.0)]
    with pytest.raises(ValueError, match="'self' is not a text"):
        load_text("self")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_sources("self=2,missing/wiki.txt=1")
    # the counts text mixes use (largest remainder, ties to the earlier source), shared with "self"
    assert window_counts([2.0, 1.0, 1.0], 10) == [5, 3, 2]
    assert window_counts([3.0, 1.0], 32) == [24, 8]
    with pytest.raises(ValueError, match="gets no window"):
        window_counts([100.0, 1.0], 10)
