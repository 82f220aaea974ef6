"""``leanformers-compress SOURCE --method M --output out/`` (also installed as ``mpifa-compress``).

SOURCE is a Hub id, a local folder, or a ``.gguf`` file; ``--method`` is any registered compressor
(mpifa, svd-llm, asvd, svd, wanda-2:4, sparsegpt-2:4). The output is a normal Hugging Face folder
(safetensors, config.json, tokenizer, model card): low-rank methods reload with
``AutoModelForCausalLM.from_pretrained`` after ``import leanformers``, pruned ones without it.
``--method a,b,c --compare`` compresses a fresh copy per method and prints one table (compare.py).
The options are in options.py; the work is done by library functions (compress, compress_pretrained,
save_compressed, perplexity, zero_shot).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from leanformers.compression.checkpoint_io import PeakHostMemory
from leanformers.compression.commands import (
    check_output,
    evaluation_table,
    load_source,
    model_card_for,
    parse_dtype,
    shard_size,
    sparsity_of,
    summary_of,
    zero_shot_table,
)
from leanformers.compression.compare import run_compare
from leanformers.compression.config import CompressionConfig
from leanformers.compression.options import build_configs, resolve_options
from leanformers.compression.pipeline import compress, resolve_layout
from leanformers.compression.pretrained import compress_pretrained
from leanformers.compression.report import CompressionReport
from leanformers.data.text import check_sources
from leanformers.folders import write_text_atomic

__all__ = ["main", "run", "run_in_memory", "run_streaming"]

_ERRORS = (ValueError, FileNotFoundError, FileExistsError, OSError, FloatingPointError)


def _tasks(opts: argparse.Namespace) -> list[str]:
    tasks = [t.strip() for t in (opts.tasks or "").split(",") if t.strip()]
    if opts.tasks_data_dir is not None and not tasks:
        raise ValueError(
            "--tasks-data-dir names where --tasks reads its files; add --tasks (e.g. arc_easy,piqa)"
        )
    if tasks:  # unknown task names and missing data files fail here, before any model work
        from leanformers.eval.zeroshot import task_manager

        task_manager(tasks, opts.tasks_data_dir)
    return tasks


def run_in_memory(opts: argparse.Namespace, config: CompressionConfig, output: Path, dtype, tasks) -> dict:
    """Load, evaluate, compress, evaluate, save (with its model card), publish, report."""
    from leanformers.eval import perplexity
    from leanformers.storage.saving import save_compressed

    model, tokenizer, load_seconds = load_source(opts, dtype)
    # The layout (blocks, groups) is resolved now, before any evaluation or calibration pass: an
    # unsupported or already compressed model fails in seconds.
    resolve_layout(model, config)
    before = after = eval_ids = None
    if opts.eval:
        from leanformers.data import load_text, tokenize_text

        eval_ids = tokenize_text(load_text(opts.eval), tokenizer)
        before = perplexity(model, text=eval_ids, seqlen=opts.eval_seqlen, max_tokens=opts.eval_tokens)
        print(f"perplexity before: {before}", file=sys.stderr)
    zs_before = (
        zero_shot_table(model, tokenizer, tasks, opts.tasks_limit, opts.tasks_data_dir) if tasks else None
    )
    teacher = copy.deepcopy(model) if opts.heal_tokens else None  # the dense model healing distils
    with PeakHostMemory() as memory:
        report = compress(model, tokenizer, config, calibration=opts.calib)
        healing = _heal(opts, config, model, teacher, tokenizer) if teacher is not None else None
    report.peak_host_rss_bytes = memory.peak
    del teacher
    zs_after = (
        zero_shot_table(model, tokenizer, tasks, opts.tasks_limit, opts.tasks_data_dir) if tasks else None
    )
    if eval_ids is not None:
        after = perplexity(model, text=eval_ids, seqlen=opts.eval_seqlen, max_tokens=opts.eval_tokens)
        print(f"perplexity after:  {after}", file=sys.stderr)

    summary = {"source": str(opts.source), "output": str(output), **summary_of(opts, config, report)}
    summary["load time"] = f"{load_seconds:.1f} s"
    if healing is not None:
        summary["healing"] = (
            f"{healing.tokens:,} tokens, {healing.steps} steps at learning rate {healing.config['learning_rate']:g}, "
            f"KL to the dense model {healing.kl_before:.4g} -> {healing.kl_after:.4g}, {healing.seconds:.0f} s"
        )
        if not healing.kept:
            summary["healing"] = f"DISCARDED (the KL rose; the model is saved unhealed): {summary['healing']}"
    if before is not None:
        summary[f"ppl before ({before.seqlen} ctx, {before.n_tokens:,} tok)"] = f"{before.ppl:.3f}"
        summary["ppl after"] = f"{after.ppl:.3f}"
    if zs_before is not None:
        from leanformers.eval.zeroshot import before_after_rows

        summary.update({f"zero-shot {k}": v for k, v in before_after_rows(zs_before, zs_after).items()})
    evaluation = evaluation_table(opts, before, after, zs_before, zs_after)
    card = model_card_for(opts, config, summary, evaluation, sparsity_of(config, report), report.provenance)
    save_compressed(
        model,
        tokenizer,
        output,
        overwrite=bool(opts.overwrite),
        model_card=card,
        max_shard_size=shard_size(opts.max_shard_size),
    )
    summary["saved"] = str(output)
    _publish(opts, output, summary)
    extra = {}
    if before is not None:
        extra["perplexity"] = {"before": before.__dict__, "after": after.__dict__}
    if zs_before is not None:
        extra["zero_shot"] = {"before": zs_before, "after": zs_after}
    _write_report(opts, summary, report, config, extra)
    return summary


def _heal(opts, config: CompressionConfig, model, teacher, tokenizer):
    """--heal-tokens: distil ``teacher`` into the compressed factors (compressors/healing.py)."""
    from leanformers.compressors.healing import heal

    return heal(model, teacher, tokenizer, _healing_config(opts, config))


def _healing_config(opts: argparse.Namespace, config: CompressionConfig):
    from leanformers.compressors.healing import HealingConfig

    rate = {} if opts.heal_lr is None else {"learning_rate": opts.heal_lr}
    return HealingConfig(tokens=opts.heal_tokens, seqlen=config.seqlen, seed=config.seed, **rate)


def run_streaming(opts: argparse.Namespace, config: CompressionConfig, output: Path, dtype, tasks) -> dict:
    """--stream: ``compress_pretrained`` from the source folder's shards to the output folder."""
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
    print(f"streaming {source} block by block ...", file=sys.stderr)

    def card(report: CompressionReport) -> str:
        return model_card_for(
            opts, config, summary_of(opts, config, report), None, sparsity_of(config, report)
        )

    report = compress_pretrained(
        source,
        output,
        config,
        calibration=opts.calib,
        tokenizer=tokenizer,
        dtype=dtype,
        overwrite=bool(opts.overwrite),
        max_shard_size=shard_size(opts.max_shard_size),
        model_card=card,
    )
    summary = {"source": str(opts.source), "output": str(output), **summary_of(opts, config, report)}
    summary["saved"] = str(output)
    _publish(opts, output, summary)
    _write_report(opts, summary, report, config, {})
    return summary


def _publish(opts: argparse.Namespace, output: Path, summary: dict) -> None:
    """Push when asked, then print the summary table."""
    if opts.push_to_hub:
        from leanformers.hub import push_folder_to_hub

        summary["pushed to"] = push_folder_to_hub(output, opts.push_to_hub, private=bool(opts.private))
    width = max(len(k) for k in summary)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in summary.items()))


def _write_report(
    opts, summary: dict, report: CompressionReport, config: CompressionConfig, extra: dict
) -> None:
    if opts.report:
        full = {"summary": summary, "report": report.to_dict(), "config": config.to_dict(), **extra}
        write_text_atomic(Path(opts.report), json.dumps(full, indent=2, default=str))


def _check_healing(opts: argparse.Namespace, configs: list[CompressionConfig]) -> None:
    if opts.heal_lr is not None and not opts.heal_tokens:
        raise ValueError(
            "--heal-lr sets the learning rate of healing, which runs only with --heal-tokens N: add it"
        )
    if not opts.heal_tokens:
        return
    if opts.heal_tokens < 0:
        raise ValueError(f"--heal-tokens must be >= 0, got {opts.heal_tokens}")
    _healing_config(opts, configs[0])  # a bad --heal-lr (<= 0, nan) stops here, before any model work
    where = "--stream" if opts.stream else "--compare" if opts.compare else None
    if where:
        raise ValueError(f"--heal-tokens needs the dense and the compressed model in memory: drop {where}")
    pruned = [c.method for c in configs if "pattern" in c.field_names()]
    if pruned:
        raise ValueError(
            f"--heal-tokens trains the factors of low-rank layers; {pruned[0]} prunes weights, which are not "
            "healed: drop --heal-tokens or use mpifa / svd-llm / asvd / svd"
        )


def run(opts: argparse.Namespace) -> dict:
    """Do the work of the command line; returns the summary dict (also printed)."""
    # Cheap checks first: a bad setting or an occupied output must not cost a model load.
    configs = build_configs(opts)
    check_sources(opts.calib)
    output = Path(opts.output).expanduser()
    check_output(output, bool(opts.overwrite), opts.source)
    dtype = parse_dtype(opts.dtype)
    tasks = _tasks(opts)
    _check_healing(opts, configs)
    if opts.compare:
        return run_compare(opts, configs, output, dtype, tasks)
    if len(configs) > 1:
        raise ValueError(f"--method {opts.method} names several methods: add --compare to compare them")
    if opts.stream:
        return run_streaming(opts, configs[0], output, dtype, tasks)
    return run_in_memory(opts, configs[0], output, dtype, tasks)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    prog = prog or (
        Path(sys.argv[0]).name if Path(sys.argv[0]).name == "mpifa-compress" else "leanformers-compress"
    )
    opts = resolve_options(argv, prog=prog)
    try:
        run(opts)
    except _ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
