"""The shipped evaluate metric modules load offline by path and score as sacrebleu / scikit-learn do."""

from __future__ import annotations

import pytest

evaluate = pytest.importorskip("evaluate")

from leanformers.eval.metrics import SHIPPED, load_metric, shipped_path  # noqa: E402

REFS = [
    "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
    "Mehrere Männer mit Schutzhelmen bedienen ein Antriebsradsystem.",
    "Ein kleines Mädchen klettert in ein Spielhaus aus Holz.",
]
HYPS = [
    "Zwei junge Männer sind draußen bei Büschen.",
    "Männer mit Helmen bedienen ein System.",
    "Ein Mädchen klettert in ein Spielhaus aus Holz.",
]


def test_offline_loader_uses_the_shipped_modules(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in SHIPPED:
        module = load_metric(name)
        assert isinstance(module, evaluate.EvaluationModule)
        assert shipped_path(name).is_file()
    with pytest.raises(ValueError, match="is not shipped with leanformers"):
        load_metric("rouge", prefer="shipped")


def test_bleu_of_references_against_themselves_is_100_and_matches_sacrebleu():
    import sacrebleu

    bleu = load_metric("sacrebleu", prefer="shipped")
    assert bleu.compute(predictions=REFS, references=[[r] for r in REFS])["score"] == pytest.approx(100.0)
    got = bleu.compute(predictions=HYPS, references=[[r] for r in REFS])
    assert 0 < got["score"] < 100
    assert got["score"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    chrf = load_metric("chrf", prefer="shipped")
    assert chrf.compute(predictions=REFS, references=[[r] for r in REFS])["score"] == pytest.approx(100.0)
    assert chrf.compute(predictions=HYPS, references=[[r] for r in REFS])["score"] == pytest.approx(
        sacrebleu.corpus_chrf(HYPS, [REFS]).score
    )


def test_accuracy_and_f1_match_scikit_learn():
    from sklearn.metrics import f1_score

    refs, preds = [0, 1, 1, 0, 1, 1, 0], [0, 1, 0, 0, 1, 0, 1]
    assert load_metric("accuracy", prefer="shipped").compute(predictions=preds, references=refs)[
        "accuracy"
    ] == pytest.approx(4 / 7)
    f1 = load_metric("f1", prefer="shipped")
    assert f1.compute(predictions=preds, references=refs)["f1"] == pytest.approx(f1_score(refs, preds))
    assert f1.compute(predictions=refs, references=refs)["f1"] == 1.0
