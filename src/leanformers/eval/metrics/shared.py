"""What the shipped metric modules share: their input features and the reference layout sacrebleu wants.

The modules import this by absolute name (``evaluate`` copies a module file into its cache before
importing it, so relative imports would not resolve there).
"""

from __future__ import annotations

import datasets
import evaluate


def text_features() -> list[datasets.Features]:
    """Inputs of a text metric: one or several references per prediction, or one plain string."""
    string = datasets.Value("string", id="sequence")
    return [
        datasets.Features({"predictions": string, "references": datasets.Sequence(string, id="references")}),
        datasets.Features({"predictions": string, "references": string}),
    ]


def text_metric_info(description: str, kwargs_doc: str, citation: str, homepage: str) -> evaluate.MetricInfo:
    """``MetricInfo`` of a text metric computed by sacrebleu."""
    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=kwargs_doc,
        homepage=homepage,
        features=text_features(),
    )


def label_metric_info(description: str, kwargs_doc: str, sklearn_name: str) -> evaluate.MetricInfo:
    """``MetricInfo`` of a classification metric computed by ``sklearn.metrics.<sklearn_name>``."""
    return evaluate.MetricInfo(
        description=description,
        citation="scikit-learn: Machine Learning in Python, Pedregosa et al., JMLR 12, 2011",
        inputs_description=kwargs_doc,
        features=datasets.Features(
            {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
        ),
        reference_urls=[
            f"https://scikit-learn.org/stable/modules/generated/sklearn.metrics.{sklearn_name}.html"
        ],
    )


def references_by_position(references: list, metric: str) -> list[list[str]]:
    """(n predictions) lists of k references -> k lists of n references, as sacrebleu's corpus scores take.

    A plain list of strings counts as one reference each; a ragged number of references is an error.
    """
    if references and isinstance(references[0], str):
        references = [[ref] for ref in references]
    counts = {len(refs) for refs in references}
    if len(counts) != 1:
        raise ValueError(f"{metric} needs the same number of references for every prediction")
    return [[refs[i] for refs in references] for i in range(counts.pop())]
