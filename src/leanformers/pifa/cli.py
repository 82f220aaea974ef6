"""``mpifa-compress SOURCE --density 0.5 --output out/``: compress a causal LM with M + PIFA.

SOURCE is a Hub id, a local folder, or a ``.gguf`` file. The output is a normal Hugging Face folder
(safetensors, config.json with ``quantization_config``, tokenizer, model card) that
``AutoModelForCausalLM.from_pretrained`` reloads after ``import leanformers``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from leanformers import recipes
from leanformers.data.text import check_sources
from leanformers.pifa import MPIFAConfig
from leanformers.pifa.checkpoint_io import PeakHostMemory

# WikiText (online through datasets) mixed 3:1 with Python source that every install has: a calibration
# that has seen no code made code 300-400x more perplexed at density 0.5 (docs/benchmarks.md §14).
DEFAULT_CALIBRATION = "wikitext:wikitext-2-raw-v1@train=3,python:transformers.generation=1"

# CLI-only options: name -> (type, default, help). The compression settings are not listed here:
# their flags are generated from MPIFAConfig's fields (CONFIG_FLAGS), so their defaults live once.
CLI_OPTIONS: dict[str, tuple] = {
    "output": (str, None, "output folder (required)"),
    "calib": (
        str,
        DEFAULT_CALIBRATION,
        "calibration text: a local .txt/.json/.parquet/.py file, a folder of them or a datasets "
        "name[:config][@split]; several sources mix by weight: 'wiki.txt=2,code/=1'",
    ),
    "lowrank": (bool, False, "write low-rank U V layers instead of PIFA (baseline)"),
    "dtype": (str, "auto", "dtype to load and save the model in: auto, float32, bfloat16, float16"),
    "gguf_file": (str, None, "GGUF file name inside SOURCE (when SOURCE is a folder or Hub id)"),
    "eval": (str, None, "text file (or dataset) to measure perplexity on before and after"),
    "eval_seqlen": (int, 2048, "context length of the perplexity evaluation"),
    "eval_tokens": (int, None, "evaluate on the first N tokens only"),
    "tasks": (str, None, "lm-eval zero-shot tasks to score before and after, e.g. arc_easy,piqa"),
    "tasks_limit": (int, None, "documents per zero-shot task (default: all)"),
    "push_to_hub": (str, None, "publish the output folder to this Hub repo (org/name)"),
    "private": (bool, False, "make the Hub repo private"),
    "overwrite": (bool, False, "replace an existing non-empty output folder"),
    "stream": (
        bool,
        False,
        "compress block by block from the safetensors shards of a local SOURCE folder, for a model larger "
        "than host memory (one block in memory at a time; see docs/scaling.md (MPIFA streaming))",
    ),
    "max_shard_size": (str, "5GB", "largest safetensors shard of the output folder"),
    "report": (str, None, "also write the summary as JSON to this file"),
}

# MPIFAConfig fields that get no flag: ``output`` is the folder on the command line (--lowrank picks the
# layer kind) and the lists ``targets`` / ``attention`` are Python-API settings.
_NO_FLAG = {"output", "targets", "attention"}
# The command line's own spelling of a field (a string that parse_groups splits), or a field whose
# docstring entry is shared with another one and says too little on its own.
_CLI_FIELDS: dict[str, tuple] = {
    "seqlen": (int, "tokens per calibration window"),
    "blocks_path": (str, "layout override: path of the ModuleList of blocks (default: inferred)"),
    "groups": (
        str,
        "layout override: linears inside a block, ',' within a group sharing one input, ';' between "
        "groups in order, e.g. 'attn.q,attn.k,attn.v;attn.o;mlp.up;mlp.down' (default: inferred)",
    ),
}
_SCALARS = {"bool": bool, "int": int, "float": float, "str": str}


def _scalar_name(annotation) -> str:
    """'float' for float, 'float | None', Optional[float] or their string forms (postponed annotations)."""
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation).replace("typing.", "").replace(" | None", "").replace("None | ", "")
    return text.removeprefix("Optional[").removesuffix("]") if text.startswith("Optional[") else text


def _config_flags() -> dict[str, tuple]:
    """name -> (type, default, help) for every scalar MPIFAConfig field (help from its docstring)."""
    docs = recipes.field_docs(MPIFAConfig)
    flags = {}
    for f in dataclasses.fields(MPIFAConfig):
        if f.name in _NO_FLAG:
            continue
        if f.name in _CLI_FIELDS:
            typ, help_text = _CLI_FIELDS[f.name]
        else:
            base = _scalar_name(f.type)
            if base not in _SCALARS:
                raise TypeError(
                    f"MPIFAConfig.{f.name}: {f.type} has no command-line form; add it to _NO_FLAG"
                )
            typ, help_text = _SCALARS[base], docs.get(f.name, "")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        flags[f.name] = (typ, default, help_text)
    return flags


CONFIG_FLAGS: dict[str, tuple] = _config_flags()
# every option of the command line and of --config: CLI-only ones and the MPIFAConfig fields
OPTIONS: dict[str, tuple] = {**CLI_OPTIONS, **CONFIG_FLAGS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpifa-compress",
        description="Compress a causal LM with MPIFA (M reconstruction + Pivoting Factorization).",
    )
    parser.add_argument("source", nargs="?", help="Hub id, local folder or .gguf file")
    parser.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    for name, (typ, default, help_text) in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        help_text = help_text.replace("``", "").replace("%", "%%")
        if typ is bool and default:  # on by default: --no-<flag> turns it off
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text + " (default: on)"
            )
        elif typ is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            shown = f" (default: {default})" if default is not None else ""
            parser.add_argument(flag, type=typ, default=None, help=help_text + shown)
    return parser


def resolve_options(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags, merged over a YAML --config, merged over the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    merged = {name: spec[1] for name, spec in OPTIONS.items()}
    merged["source"] = None
    if args.config:
        try:
            data = {k.replace("-", "_"): v for k, v in recipes.read_yaml(args.config).items()}
            recipes.check_keys(data, merged, what=f"keys in {args.config}:")
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
        merged.update(data)
    merged.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    if not merged["source"]:
        parser.error("give the model to compress (a Hub id, a local folder or a .gguf file)")
    if not merged["output"]:
        parser.error("--output is required")
    return argparse.Namespace(**merged)


def build_config(opts: argparse.Namespace) -> MPIFAConfig:
    """The MPIFAConfig of the resolved options (--lowrank -> output="lowrank", --groups parsed)."""
    values = {name: getattr(opts, name) for name in CONFIG_FLAGS}
    values["groups"] = parse_groups(values["groups"])
    return MPIFAConfig(**values, output="lowrank" if opts.lowrank else "pifa")


def _check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--output {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"--output {path} exists and is not empty; pass --overwrite to replace it")


def _dtype(name: str):
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


def parse_groups(value) -> list[list[str]] | None:
    """--groups 'a,b,c;d;e,f;g' (or a YAML list of lists) -> [[a, b, c], [d], [e, f], [g]]."""
    if value is None:
        return None
    if isinstance(value, str):
        groups = [[n.strip() for n in g.split(",") if n.strip()] for g in value.split(";")]
    elif isinstance(value, (list, tuple)):
        groups = [[str(n) for n in ([g] if isinstance(g, str) else g)] for g in value]
    else:
        raise ValueError(
            f"--groups must be a string like 'q,k,v;o;up;down' or a list of lists, got {value!r}"
        )
    groups = [g for g in groups if g]
    if not groups:
        raise ValueError(f"--groups {value!r} names no module")
    return groups


def run(opts: argparse.Namespace) -> dict:
    """Do the work of the CLI; returns the summary dict (also printed)."""
    from leanformers.eval import perplexity
    from leanformers.hub import load_causal_lm, model_card
    from leanformers.pifa.compress import mpifa_compress, resolve_layout
    from leanformers.pifa.quantizer import save_compressed

    # Cheap checks first: a bad density or an occupied output must not cost a model load.
    config = build_config(opts)
    check_sources(opts.calib)
    output = Path(opts.output).expanduser()
    _check_output(output, bool(opts.overwrite))
    dtype = _dtype(opts.dtype)
    tasks = [t.strip() for t in (opts.tasks or "").split(",") if t.strip()]
    if tasks:  # unknown task names and missing data files fail here, before any model work
        from leanformers.eval.zeroshot import task_manager

        task_manager(tasks)

    if opts.stream:
        return _run_streaming(opts, config, output, dtype, tasks)

    t0 = time.perf_counter()
    print(f"loading {opts.source} ...", file=sys.stderr)
    model, tokenizer = load_causal_lm(opts.source, gguf_file=opts.gguf_file, dtype=dtype)
    load_seconds = time.perf_counter() - t0
    # The layout (blocks, groups) is resolved now, before any evaluation or calibration pass: an
    # unsupported or already compressed model fails in seconds.
    resolve_layout(model, config)

    eval_before = eval_after = None
    eval_ids = None
    if opts.eval:
        from leanformers.data import load_text, tokenize_text

        eval_ids = tokenize_text(load_text(opts.eval), tokenizer)
        eval_before = perplexity(model, text=eval_ids, seqlen=opts.eval_seqlen, max_tokens=opts.eval_tokens)
        print(f"perplexity before: {eval_before}", file=sys.stderr)

    zero_shot_before = _zero_shot(model, tokenizer, tasks, opts.tasks_limit) if tasks else None
    with PeakHostMemory() as memory:
        report = mpifa_compress(model, tokenizer, config, calibration=opts.calib)
    report.peak_host_rss_bytes = memory.peak
    zero_shot_after = _zero_shot(model, tokenizer, tasks, opts.tasks_limit) if tasks else None

    if eval_ids is not None:
        eval_after = perplexity(model, text=eval_ids, seqlen=opts.eval_seqlen, max_tokens=opts.eval_tokens)
        print(f"perplexity after:  {eval_after}", file=sys.stderr)

    summary = {
        "source": str(opts.source),
        "output": str(output),
        "targeted params": f"{report.targeted_params_before:,} -> {report.targeted_params_after:,}",
        "achieved density (targeted)": f"{report.achieved_density:.4f} (asked {config.density})",
        "model params": f"{report.model_params_before:,} -> {report.model_params_after:,}",
        "model density (whole model)": f"{report.model_density:.4f}",
        "calibration": f"{report.calibration}",
        "load time": f"{load_seconds:.1f} s",
        "compression time": f"{report.seconds:.1f} s",
        "peak host memory (RSS)": _gib(report.peak_host_rss_bytes),
    }
    evaluation = None
    if eval_before is not None:
        evaluation = {
            "text": os.path.basename(str(opts.eval)),
            "context": eval_before.seqlen,
            "predicted tokens": f"{eval_before.n_tokens:,}",
            "perplexity before": f"{eval_before.ppl:.3f}",
            "perplexity after": f"{eval_after.ppl:.3f}",
        }
        summary.update(
            {
                f"ppl before ({eval_before.seqlen} ctx, {eval_before.n_tokens:,} tok)": f"{eval_before.ppl:.3f}",
                "ppl after": f"{eval_after.ppl:.3f}",
            }
        )
    if zero_shot_before is not None:
        from leanformers.eval.zeroshot import before_after_rows

        rows = before_after_rows(zero_shot_before, zero_shot_after)
        summary.update({f"zero-shot {k}": v for k, v in rows.items()})
        evaluation = {**(evaluation or {}), **{f"zero-shot (lm-eval) {k}": v for k, v in rows.items()}}
    card = model_card(
        base_model=str(opts.source),
        method="MPIFA",
        summary={k: v for k, v in summary.items() if k not in ("output",)},
        settings={
            k: v for k, v in config.to_dict().items() if v is not None and k not in ("groups", "attention")
        },
        evaluation=evaluation,
    )
    save_compressed(
        model,
        tokenizer,
        output,
        model.config.quantization_config,
        overwrite=bool(opts.overwrite),
        model_card=card,
        max_shard_size=_shard_size(opts.max_shard_size),
    )
    summary["saved"] = str(output)
    _publish(opts, output, summary)
    if opts.report:
        full = {"summary": summary, "report": report.to_dict(), "config": config.to_dict()}
        if eval_before is not None:
            full["perplexity"] = {"before": eval_before.__dict__, "after": eval_after.__dict__}
        if zero_shot_before is not None:
            full["zero_shot"] = {"before": zero_shot_before, "after": zero_shot_after}
        Path(opts.report).write_text(json.dumps(full, indent=2, default=str))
    return summary


def _gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


def _shard_size(value) -> int | str:
    return int(value) if isinstance(value, int) or str(value).isdigit() else str(value)


def _publish(opts: argparse.Namespace, output: Path, summary: dict) -> None:
    """Push when asked, then print the summary table."""
    if opts.push_to_hub:
        from leanformers.hub import push_folder_to_hub

        summary["pushed to"] = push_folder_to_hub(output, opts.push_to_hub, private=bool(opts.private))
    width = max(len(k) for k in summary)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in summary.items()))


def _run_streaming(opts: argparse.Namespace, config: MPIFAConfig, output: Path, dtype, tasks) -> dict:
    """--stream: ``mpifa_compress_pretrained`` from the source folder's shards to the output folder."""
    from leanformers.hub import model_card
    from leanformers.pifa.streaming import mpifa_compress_pretrained

    refused = [
        flag
        for flag, on in (("--eval", opts.eval), ("--tasks", tasks), ("--gguf-file", opts.gguf_file))
        if on
    ]
    if refused or str(opts.source).endswith(".gguf"):
        raise ValueError(
            f"--stream compresses from a safetensors folder without loading the model, so it cannot take "
            f"{', '.join(refused) or 'a .gguf file'}: evaluate the output folder afterwards (leanformers-eval), "
            "or drop --stream"
        )
    source = Path(opts.source).expanduser()
    if not source.is_dir():
        raise FileNotFoundError(
            f"--stream reads a local model folder; {source} is not one (download a Hub model first, e.g. "
            "`hf download <id> --local-dir <folder>`)"
        )
    tokenizer = None
    if any(source.glob("tokenizer*")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)

    def card(report) -> str:
        return model_card(
            base_model=str(opts.source),
            method="MPIFA",
            summary=_summary(opts, config, report),
            settings={
                k: v
                for k, v in config.to_dict().items()
                if v is not None and k not in ("groups", "attention")
            },
        )

    print(f"streaming {source} block by block ...", file=sys.stderr)
    report = mpifa_compress_pretrained(
        source,
        output,
        config,
        calibration=opts.calib,
        tokenizer=tokenizer,
        dtype=dtype,
        overwrite=bool(opts.overwrite),
        max_shard_size=_shard_size(opts.max_shard_size),
        model_card=card,
    )
    summary = {"source": str(opts.source), "output": str(output), **_summary(opts, config, report)}
    summary["saved"] = str(output)
    _publish(opts, output, summary)
    if opts.report:
        full = {"summary": summary, "report": report.to_dict(), "config": config.to_dict()}
        Path(opts.report).write_text(json.dumps(full, indent=2, default=str))
    return summary


def _summary(opts: argparse.Namespace, config: MPIFAConfig, report) -> dict:
    return {
        "targeted params": f"{report.targeted_params_before:,} -> {report.targeted_params_after:,}",
        "achieved density (targeted)": f"{report.achieved_density:.4f} (asked {config.density})",
        "model params": f"{report.model_params_before:,} -> {report.model_params_after:,}",
        "model density (whole model)": f"{report.model_density:.4f}",
        "calibration": f"{report.calibration}",
        "mode": f"streaming (offload {config.offload})"
        if opts.stream
        else f"in memory (offload {config.offload})",
        "compression time": f"{report.seconds:.1f} s",
        "peak host memory (RSS)": _gib(report.peak_host_rss_bytes),
    }


def _zero_shot(model, tokenizer, tasks: list[str], limit: int | None) -> dict:
    """lm-eval zero-shot accuracy table of the in-memory model (local task files when present)."""
    from leanformers.eval.zeroshot import accuracy_table, format_accuracy_table, zero_shot

    table = accuracy_table(zero_shot(model, tokenizer, tasks, limit=limit))
    print("zero-shot: " + "; ".join(format_accuracy_table(table)), file=sys.stderr)
    return table


def main(argv: list[str] | None = None) -> int:
    opts = resolve_options(argv)
    try:
        run(opts)
    except (ValueError, FileNotFoundError, FileExistsError, OSError, FloatingPointError) as exc:
        print(f"mpifa-compress: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
