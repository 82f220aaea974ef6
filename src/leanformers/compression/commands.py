"""The steps of a compression command that the single-method run (cli.py) and ``--compare``
(compare.py) share: loading the source, zero-shot tables, the summary, the model card."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from leanformers.compression.compressor import compressor_for
from leanformers.compression.config import CompressionConfig
from leanformers.compression.report import CompressionReport
from leanformers.folders import check_output as folders_check_output
from leanformers.storage.sparsity import sparsity_record

__all__ = [
    "check_output",
    "evaluation_table",
    "gib",
    "load_source",
    "model_card_for",
    "parse_dtype",
    "shard_size",
    "sparsity_of",
    "summary_of",
    "zero_shot_table",
]


def check_output(path: Path, overwrite: bool, source: str | None = None) -> None:
    """The --output folder can be written: not a symlink, not the source folder (or a folder holding or
    inside it), empty or --overwrite. A local source file (.gguf) protects its folder too."""
    protected = []
    if source is not None and Path(source).expanduser().exists():
        local = Path(source).expanduser()
        protected.append(local if local.is_dir() else local.parent)
    try:
        folders_check_output(path, overwrite=overwrite, protected=protected)
    except FileExistsError as exc:
        raise FileExistsError(str(exc).replace("overwrite=True (--overwrite)", "--overwrite")) from None


def parse_dtype(name: str):
    import torch

    table = {
        "auto": "auto",
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name not in table:
        raise ValueError(f"--dtype must be one of auto, float32, bfloat16, float16; got {name!r}")
    return table[name]


def load_source(opts: argparse.Namespace, dtype):
    """(model, tokenizer, seconds) of SOURCE."""
    from leanformers.hub import load_causal_lm

    t0 = time.perf_counter()
    print(f"loading {opts.source} ...", file=sys.stderr)
    model, tokenizer = load_causal_lm(
        opts.source, gguf_file=opts.gguf_file, dtype=dtype, revision=opts.revision
    )
    return model, tokenizer, time.perf_counter() - t0


def zero_shot_table(
    model, tokenizer, tasks: list[str], limit: int | None, data_dir: str | None = None
) -> dict:
    """lm-eval zero-shot accuracy table of the in-memory model (local task files from ``data_dir``, default
    ``eval.tasks.default_data_dir()`` when present)."""
    from leanformers.eval.zeroshot import accuracy_table, format_accuracy_table, zero_shot

    table = accuracy_table(zero_shot(model, tokenizer, tasks, limit=limit, data_dir=data_dir))
    print("zero-shot: " + "; ".join(format_accuracy_table(table)), file=sys.stderr)
    return table


def gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


def shard_size(value) -> int | str:
    return int(value) if isinstance(value, int) or str(value).isdigit() else str(value)


def summary_of(opts: argparse.Namespace, config: CompressionConfig, report: CompressionReport) -> dict:
    asked = getattr(config, "density", None)
    asked = f" (asked {asked})" if asked is not None else f" (pattern {getattr(config, 'pattern', '?')})"
    return {
        "method": report.method,
        "targeted params": f"{report.targeted_params_before:,} -> {report.targeted_params_after:,}",
        "achieved density (targeted)": f"{report.achieved_density:.4f}{asked}",
        "model params": f"{report.model_params_before:,} -> {report.model_params_after:,}",
        "model density (whole model)": f"{report.model_density:.4f}",
        "calibration": f"{report.calibration}",
        "calibration sha256": report.calibration_sha256 or "-",
        "mode": f"streaming (offload {config.offload})"
        if opts.stream
        else f"in memory (offload {config.offload})",
        "compression time": f"{report.seconds:.1f} s",
        "peak host memory (RSS)": gib(report.peak_host_rss_bytes),
        **notes_of(report),
    }


def sparsity_of(config: CompressionConfig, report: CompressionReport) -> dict | None:
    """The sparsity record of a pruning run (None for compressors that write compressed layers)."""
    pattern = getattr(config, "pattern", None)
    return (
        None if pattern is None else sparsity_record(report.method, pattern, [m.name for m in report.modules])
    )


def notes_of(report: CompressionReport) -> dict:
    """The modules the user should hear about (e.g. stored below their planned rank), for the summary."""
    notes = [m for m in report.modules if m.note]
    if not notes:
        return {}
    shown = "; ".join(f"{m.name}: {m.note}" for m in notes[:3])
    return {
        "notes": f"{len(notes)} module(s): {shown}" + (" ... (all in --report)" if len(notes) > 3 else "")
    }


def model_card_for(
    opts, config: CompressionConfig, summary: dict, evaluation: dict | None, sparsity=None, provenance=None
) -> str:
    from leanformers.hub import model_card

    compressor = compressor_for(config)
    return model_card(
        base_model=str(opts.source),
        method=compressor.name,
        summary={k: v for k, v in summary.items() if k != "output"},
        settings=compressor.describe(),
        evaluation=evaluation,
        sparsity=sparsity,
        provenance=provenance,
    )


def evaluation_table(opts, before, after, zs_before, zs_after) -> dict | None:
    evaluation = None
    if before is not None:
        evaluation = {
            "text": os.path.basename(str(opts.eval)),
            "context": before.seqlen,
            "predicted tokens": f"{before.n_tokens:,}",
            "perplexity before": f"{before.ppl:.3f}",
            "perplexity after": f"{after.ppl:.3f}",
        }
    if zs_before is not None:
        from leanformers.eval.zeroshot import before_after_rows

        rows = before_after_rows(zs_before, zs_after)
        evaluation = {**(evaluation or {}), **{f"zero-shot (lm-eval) {k}": v for k, v in rows.items()}}
    return evaluation
