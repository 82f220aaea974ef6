"""Text sources -> token ids -> (n, seqlen) windows.

A source is a local ``.txt``/``.json``/``.jsonl``/``.parquet`` file, a source-code or markup file
(``.py``, ``.md``, ``.rst``, read verbatim), a folder of those, or (online) a ``datasets`` name written
``name[:config][@split]``, e.g. ``wikitext:wikitext-2-raw-v1@test``, or ``python:<module>``: the Python
source of an installed module or package (``python:transformers.generation``; offline everywhere,
a code domain for calibration). Calibration may mix several
sources with weights: ``parse_sources("wiki.txt=2,code/=1")`` and ``mixed_calibration_windows``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

__all__ = [
    "calibration_windows",
    "evaluation_windows",
    "load_text",
    "check_sources",
    "mixed_calibration_windows",
    "parse_sources",
    "python_source_path",
    "read_utf8",
    "shared_data_path",
    "source_list",
    "source_weight",
    "tokenize_text",
]

_CODE_SUFFIXES = (".py", ".md", ".rst")  # read verbatim: blank lines and indentation are content
_TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", *_CODE_SUFFIXES)


def shared_data_path(name: str = "") -> Path:
    """Path of a file in the project's shared text folder (``../shared/data`` beside the checkout).

    ``LEANFORMERS_DATA`` overrides the folder. Raises FileNotFoundError naming both places when absent.
    """
    candidates = []
    if os.environ.get("LEANFORMERS_DATA"):
        candidates.append(Path(os.environ["LEANFORMERS_DATA"]))
    here = Path(__file__).resolve()
    # src/leanformers/data/text.py -> repository root is parents[3]; shared/ sits beside it.
    candidates += [here.parents[4] / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for folder in candidates:
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(
        f"shared data file {name!r} not found in {[str(c) for c in candidates]}; "
        "set LEANFORMERS_DATA to the folder that holds it"
    )


def _rows_to_text(rows: list[str], join: str | None) -> str:
    rows = [r for r in rows if r.strip()]
    return (join if join is not None else "\n").join(rows)


def read_utf8(path: Path) -> str:
    """The text of ``path``; a file that is not UTF-8 is a ValueError naming it and the first bad byte
    (never decoded with replacement characters: the text would silently differ from the file)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it to UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8`) or leave it out of the calibration"
        ) from None


def _read_file(path: Path, text_field: str, join: str | None) -> str:
    suffix = path.suffix.lower()
    if suffix in _CODE_SUFFIXES:
        return read_utf8(path)
    if suffix == ".txt" or suffix not in (".json", ".jsonl", ".parquet"):
        # .txt, or a file named explicitly with another suffix (e.g. Multi30k's train.en): plain text.
        # Folders only contribute the suffixes listed in _TEXT_SUFFIXES.
        raw = read_utf8(path)
        # WikiText convention (DATA.md): each non-empty line is a row; rows are joined with "\n\n".
        return raw if join is None else _rows_to_text(raw.splitlines(), join)
    if suffix in (".json", ".jsonl"):
        raw = read_utf8(path)
        try:
            data = json.loads(raw)
            records = data if isinstance(data, list) else [data]
        except json.JSONDecodeError:
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        rows = [r[text_field] if isinstance(r, dict) else str(r) for r in records]
        return _rows_to_text(rows, join if join is not None else "\n\n")
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=[text_field])
    return _rows_to_text(table.column(text_field).to_pylist(), join if join is not None else "\n\n")


def load_text(source: str | os.PathLike, *, text_field: str = "text", join: str | None = "\n\n") -> str:
    """Load a text corpus as one string.

    Args:
        source: a local file or folder (see module docstring) or a ``datasets`` name
            ``name[:config][@split]`` (split defaults to ``train``; needs network or the datasets cache).
        text_field: column/field that holds the text in json/parquet/datasets sources.
        join: separator between non-empty rows (``"\\n\\n"`` as in the WikiText convention); ``None``
            reads ``.txt`` files verbatim.
    """
    if str(source).startswith("python:"):
        path = python_source_path(str(source)[len("python:") :])
        join = None  # source code is read verbatim
    else:
        path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"folder {path} holds no {'/'.join(_TEXT_SUFFIXES)} files")
        return "\n\n".join(_read_file(p, text_field, join) for p in files)
    if path.exists():
        return _read_file(path, text_field, join)
    if path.suffix.lower() in _TEXT_SUFFIXES or os.sep in str(source):
        raise FileNotFoundError(f"text file {source} does not exist")
    return _load_dataset_text(str(source), text_field, join)


def _find_spec(name: str, path: list[str] | None):
    """The spec the import system would use for ``name`` under the parent package ``path``, asking each
    meta-path finder directly: a finder only searches, so no package's ``__init__`` runs (unlike
    ``importlib.util.find_spec``, which imports every parent package of a dotted name)."""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(name, path)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            return spec
    return None


def python_source_path(module: str) -> Path:
    """Folder (package) or file (module) of an installed Python module, located WITHOUT importing it or
    any of its parent packages (calibrating on source code must not execute it)."""
    parts = module.split(".")
    if not module or not all(p.isidentifier() for p in parts):
        raise ValueError(f"python:{module}: not a dotted module name (e.g. 'json' or 'email.mime')")
    search, spec = None, None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        spec = _find_spec(name, search)
        if spec is None:
            raise ValueError(
                f"python:{module}: no installed module of that name ({name!r} not found; check the spelling)"
            )
        if i < len(parts) - 1:
            if not spec.submodule_search_locations:
                raise ValueError(f"python:{module}: {name} is a module, not a package")
            search = list(spec.submodule_search_locations)
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin is None or not spec.origin.endswith(".py"):
        raise ValueError(f"python:{module} has no Python source file (built-in or compiled: {spec.origin})")
    return Path(spec.origin)


def _load_dataset_text(spec: str, text_field: str, join: str | None) -> str:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a core dependency
        raise ImportError("loading a dataset by name needs `pip install datasets`") from exc
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:
        raise ValueError(
            f"could not load dataset {spec!r} ({type(exc).__name__}: {exc}). Offline, pass a local "
            ".txt/.json/.parquet file instead."
        ) from exc
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {spec!r} has no column {text_field!r}; columns: {ds.column_names}")
    return _rows_to_text(list(ds[text_field]), join if join is not None else "\n\n")


def tokenize_text(text: str, tokenizer, *, add_special_tokens: bool = False) -> torch.Tensor:
    """Tokenise a whole corpus into a 1-D LongTensor of ids (no truncation, no length warning)."""
    if not isinstance(text, str):
        raise TypeError(f"expected text as str, got {type(text).__name__}")
    # Long corpora exceed model_max_length by design: we window them ourselves.
    ids = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Draw ``nsamples`` windows of ``seqlen`` tokens at seeded random offsets.

    Args:
        ids: (N,) token ids.
    Returns:
        (nsamples, seqlen) LongTensor.
    Raises:
        ValueError when the corpus holds fewer than ``nsamples * seqlen`` tokens.
    """
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be >= 1, got {nsamples} and {seqlen}")
    ids = ids.reshape(-1)
    need = nsamples * seqlen
    if ids.numel() < need:
        raise ValueError(
            f"too few calibration tokens: the text has {ids.numel():,} tokens but {nsamples} x {seqlen} = "
            f"{need:,} are needed; pass a longer text or lower --nsamples / --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def evaluation_windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """Split ids into non-overlapping windows of ``seqlen`` (the tail shorter than seqlen is dropped).

    Args:
        ids: (N,) token ids; only the first ``max_tokens`` are used when given.
    Returns:
        (N // seqlen, seqlen) LongTensor.
    """
    ids = ids.reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def source_weight(source: str, weight) -> float:
    """A calibration source's weight as a positive finite float, or a ValueError naming the source."""
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise ValueError(
            f"weight {weight!r} of {source!r} is not a number; write e.g. '{source}=0.5'"
        ) from None
    if not (w > 0 and math.isfinite(w)):
        raise ValueError(f"weight of {source!r} must be a positive number, got {weight!r}")
    return w


def parse_sources(spec: str) -> list[tuple[str, float]]:
    """``"a.txt=2,code/=1,b.jsonl"`` -> [("a.txt", 2.0), ("code/", 1.0), ("b.jsonl", 1.0)].

    Sources are separated by commas; ``=WEIGHT`` (a positive number, default 1) sets a source's share
    of the calibration windows.
    """
    parts = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty source in calibration list {spec!r}; write e.g. 'wiki.txt=2,code/=1'")
        source, _, weight = item.rpartition("=") if "=" in item else (item, "", "1")
        parts.append((source.strip(), source_weight(source.strip(), weight)))
    return parts


def source_list(calibration) -> list[tuple[str, float]] | None:
    """Several weighted text sources, or None for one source / raw text.

    A list of sources or (source, weight) pairs, or a string ``"a.txt=2,code/=1"`` (``parse_sources``)
    that is not itself an existing path.
    """
    if isinstance(calibration, (list, tuple)):
        pairs = [(item, 1.0) if isinstance(item, (str, os.PathLike)) else item for item in calibration]
        return [(str(src), source_weight(str(src), w)) for src, w in pairs]
    source = str(calibration)
    if (
        ("," in source or "=" in source)
        and "\n" not in source
        and " " not in source
        and len(source) < 4096
        and not os.path.exists(source)
    ):
        return parse_sources(source)
    return None


def check_sources(spec: str) -> None:
    """Fail fast on a calibration spec whose local parts cannot be read: a bad weight, a missing file or
    folder, an unknown ``python:`` module. ``datasets`` names are left to the load (they need the Hub)."""
    for source, _ in source_list(spec) or [(spec, 1.0)]:
        if source.startswith("python:"):
            python_source_path(source[len("python:") :])
            continue
        path = Path(source).expanduser()
        if not path.exists() and (os.sep in source or path.suffix.lower() in _TEXT_SUFFIXES):
            raise FileNotFoundError(f"calibration source {source} does not exist")


def mixed_calibration_windows(
    sources: list[tuple[torch.Tensor, float]], nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens drawn from several token streams in proportion to weights.

    The counts are the largest-remainder rounding of nsamples * w_i / sum(w) (they sum to nsamples);
    source i draws its windows with ``calibration_windows(ids_i, count_i, seqlen, seed + i)``, and the
    windows are returned grouped by source, in the given order.
    Args: sources [(ids (N_i,), weight > 0)]. Returns (nsamples, seqlen) LongTensor.
    Raises ValueError when a source would get no window (raise nsamples or its weight) or is too short.
    """
    if not sources:
        raise ValueError("no calibration source given")
    weights = torch.tensor([float(w) for _, w in sources], dtype=torch.float64)
    if not bool((weights > 0).all()):
        raise ValueError("calibration weights must be positive")
    exact = nsamples * weights / weights.sum()
    counts = exact.floor().long()
    for i in torch.argsort(exact - counts, descending=True, stable=True)[: nsamples - int(counts.sum())]:
        counts[i] += 1
    if bool((counts == 0).any()):
        i = int((counts == 0).nonzero()[0])
        raise ValueError(
            f"calibration source {i} gets no window of the {nsamples} (weight {float(weights[i]):g} of "
            f"{float(weights.sum()):g}); raise nsamples or its weight"
        )
    return torch.cat(
        [
            calibration_windows(ids, int(c), seqlen, seed + i)
            for i, ((ids, _), c) in enumerate(zip(sources, counts))
        ]
    )
