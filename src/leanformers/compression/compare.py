"""``leanformers-compress SOURCE --method mpifa,svd-llm,wanda-2:4 --compare --output out/``.

The comparison users otherwise do by hand: the source is loaded once, every method compresses a fresh
copy of it on the same calibration token windows, and each result is evaluated (perplexity on --eval,
zero-shot on --tasks), saved to ``out/<method>/`` and put in one side-by-side table (also written as
``out/compare.json``): achieved density, stored bytes, compression time, perplexity, accuracies.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

from leanformers.compression.calibration import calibration_windows_for
from leanformers.compression.commands import (
    load_source,
    model_card_for,
    sparsity_of,
    summary_of,
    zero_shot_table,
)
from leanformers.compression.compressor import compressor_for
from leanformers.compression.config import CompressionConfig
from leanformers.compression.pipeline import compress, resolve_layout
from leanformers.folders import write_text_atomic

__all__ = ["folder_name", "run_compare", "stored_bytes"]


def folder_name(method: str) -> str:
    """A file-system-safe folder name for a method ("wanda-2:4" -> "wanda-2-4")."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in method)


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors a checkpoint of ``model`` stores (tied tensors once)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _check(opts: argparse.Namespace, configs: list[CompressionConfig]) -> None:
    refused = [f for f, on in (("--stream", opts.stream), ("--push-to-hub", opts.push_to_hub)) if on]
    if refused:
        raise ValueError(
            f"--compare cannot take {', '.join(refused)}: compare in memory, then push the folder you keep"
        )
    shared = {(c.nsamples, c.seqlen, c.seed) for c in configs}
    if len(shared) > 1:  # cannot happen from the command line; guards the Python use
        raise ValueError(
            "the compared configs must share nsamples, seqlen and seed (the same calibration windows)"
        )


def _row(
    method: str, density: float, nbytes: int, seconds: float | None, ppl, zero_shot: dict | None
) -> dict:
    row = {
        "method": method,
        "density": round(density, 4),
        "stored MB": round(nbytes / 1e6, 3),
        "compression s": None if seconds is None else round(seconds, 1),
        "perplexity": None if ppl is None else round(ppl.ppl, 3),
    }
    for task, acc in (zero_shot or {}).items():
        row[task] = acc
    return row


def _print_table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    print("\n" + "  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths)))


def run_compare(
    opts: argparse.Namespace, configs: list[CompressionConfig], output: Path, dtype, tasks
) -> dict:
    """Compress, evaluate and save every method's copy; returns the JSON written to compare.json."""
    from leanformers.eval import perplexity
    from leanformers.storage.saving import save_compressed

    _check(opts, configs)
    base, tokenizer, _ = load_source(opts, dtype)
    for config in configs:  # every method must accept the model before any work
        resolve_layout(base, config)
    needed = any(compressor_for(c).stream_needs().any for c in configs)
    windows, label = calibration_windows_for(opts.calib, tokenizer, configs[0], needed, model=base)
    eval_ids = None
    if opts.eval:
        from leanformers.data import load_text, tokenize_text

        eval_ids = tokenize_text(load_text(opts.eval), tokenizer)

    def evaluate(model):
        ppl = (
            perplexity(model, text=eval_ids, seqlen=opts.eval_seqlen, max_tokens=opts.eval_tokens)
            if opts.eval
            else None
        )
        zs = (
            zero_shot_table(model, tokenizer, tasks, opts.tasks_limit, opts.tasks_data_dir) if tasks else None
        )
        return ppl, zs

    ppl, zs = evaluate(base)
    rows = [_row("dense", 1.0, stored_bytes(base), None, ppl, zs)]
    folders = {}
    for config in configs:
        name = compressor_for(config).name
        print(f"--- {name} ---", file=sys.stderr)
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = compress(model, tokenizer, config, calibration=windows if needed else None)
        seconds = time.perf_counter() - t0
        ppl, zs = evaluate(model)
        folder = output / folder_name(name)
        summary = summary_of(opts, config, report)
        card = model_card_for(opts, config, summary, None, sparsity_of(config, report), report.provenance)
        save_compressed(model, tokenizer, folder, overwrite=bool(opts.overwrite), model_card=card)
        rows.append(_row(name, report.achieved_density, stored_bytes(model), seconds, ppl, zs))
        folders[name] = str(folder)
        del model
    result = {
        "source": str(opts.source),
        "calibration": label,
        "calibration_tokens": int(windows.numel()),
        "eval": None
        if not opts.eval
        else {
            "text": os.path.basename(str(opts.eval)),
            "context": opts.eval_seqlen,
            "tokens": opts.eval_tokens,
        },
        "tasks": tasks,
        "rows": rows,
        "folders": folders,
        "configs": {compressor_for(c).name: c.to_dict() for c in configs},
    }
    path = output / "compare.json"
    write_text_atomic(path, json.dumps(result, indent=2, default=str) + "\n")
    _print_table(rows)
    print(f"\nJSON: {path}")
    return result
