"""The five texts of docs/benchmarks.md §14, §19, §20 and their calibration sources for
``compression_table.py --texts``: ids, calibration windows, perplexities, healing, facts, the plot. Texts
(the first ``--eval-tokens`` of each, non-overlapping windows of ``--context``); defaults are CHOSEN on the
validation texts, never on the test texts:
  validation  ted     IWSLT14 valid.en (TED talks, lowercased and tokenised; ../shared/data/translation)
              torch   Python source of the installed torch package: torch/nn/modules/*.py, sorted
  test        wiki    WikiText-2 raw test (the WikiText calibration's domain)
              shakespeare  Tiny Shakespeare (no calibration source is like it)
              stdlib  Python standard library: the top-level *.py files of this Python, sorted
"""

from __future__ import annotations

import json
import math
import sysconfig
import time
from pathlib import Path

import torch
from harness import RESULTS, ascii_ids
from torch import nn

from leanformers import MPIFAConfig
from leanformers.compression.calibration import calibration_windows_for, windows_sha256
from leanformers.data import text as corpus
from leanformers.eval import perplexity

VALIDATION, TEST = ("ted", "torch"), ("wiki", "shakespeare", "stdlib")
CODE_FOLDERS = ("torch", "stdlib", "calib_code")  # their top-level *.py files, sorted
# calibration key -> (source, weight) parts, drawn by mixed_calibration_windows (§14)
# ("wiki_code": the composition of mpifa-compress's default --calib before issue 20, the local WikiText-2 v1
# valid standing in for the online WikiText-2 raw train split)
MIXES = {"wiki": [("calib_wiki", 1.0)], "mix": [("calib_wiki", 2.0), ("calib_captions", 1.0)]}
MIXES["mix_code"] = [*MIXES["mix"], ("calib_code", 1.0)]
MIXES["wiki_code"] = [("calib_wiki", 3.0), ("python:transformers.generation", 1.0)]
# calibration key -> a --calib SPEC (issue 20, §19): "{wiki}" is the local WikiText-2 v1 valid; a spec
# without "self@" goes through the package's calibration_windows_for; "self@NAME" generates with the
# SELF_VARIANTS[NAME] settings pinned (source i of a mix seeded seed + i), so cells measured before a
# default changed stay reproducible: t07 is §19's first schedule (1.0 -> 0.7 over 16 tokens), t1 plain
# sampling at T = 1, t1sN the same in N segments per window (§20); top-p 0.95 in all
SPECS = {"self": "self@t07", "self_wiki": "self=1,{wiki}=1", "self_own": "self@t07=3,python:leanformers=1"}
SPECS |= {"wiki_own": "{wiki}=3,python:leanformers=1", "self_t1_own": "self@t1=3,python:leanformers=1"}
SPECS |= {f"self_{v}_own": f"self@{v}=3,python:leanformers=1" for v in ("t1s2", "t1s4")}
SELF_GRID = (("t07", 0.7, 1), ("t1", 1.0, 1), ("t1s2", 1.0, 2), ("t1s4", 1.0, 4))  # name, T end, segments
SELF_VARIANTS = {v: dict(temperature_start=1.0, temperature_end=t, segments=n) for v, t, n in SELF_GRID}
CALIBRATIONS = [*MIXES, *SPECS]


def sources() -> dict[str, str]:
    """name -> where the text comes from (stated in the JSON)."""
    import transformers

    return {
        "ted": str(corpus.shared_data_path("translation/iwslt14-de-en/valid.en")),
        "torch": str(Path(torch.__file__).parent / "nn" / "modules"),
        "wiki": str(corpus.shared_data_path("wikitext-2-raw-test.txt")),
        "shakespeare": str(corpus.shared_data_path("tinyshakespeare.txt")),
        "stdlib": sysconfig.get_paths()["stdlib"],
        "calib_wiki": str(corpus.shared_data_path("wikitext-2-v1-valid.txt")),
        "calib_captions": str(corpus.shared_data_path("translation/multi30k/train.en")),
        "calib_code": str(Path(transformers.__file__).parent / "generation"),
    }


class Texts:
    """Token ids of the texts (ASCII bytes without a tokenizer: --quick) and calibration windows."""

    def __init__(self, tokenizer, model: nn.Module, seqlen: int, seed: int):
        self.tok, self.model, self.seqlen, self.seed, self.src = tokenizer, model, seqlen, seed, sources()
        self._ids: dict[str, torch.Tensor] = {}

    def text(self, name: str) -> str:
        if name.startswith("python:"):
            return corpus.load_text(name)  # the package's .py files, recursively
        if name in CODE_FOLDERS:
            files = sorted(Path(self.src[name]).glob("*.py"))
            if not files:
                raise FileNotFoundError(f"no *.py in {self.src[name]}")
            return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
        return corpus.load_text(self.src[name])

    def ids(self, name: str, limit: int | None = None) -> torch.Tensor:
        if name not in self._ids:
            text = self.text(name)
            if self.tok is None:
                self._ids[name] = ascii_ids(text, limit or 400_000)
            else:  # a prefix long enough for the limit: tokenising MBs of text costs seconds each
                head = text if limit is None else text[: max(64 * limit, 200_000)]
                self._ids[name] = corpus.tokenize_text(head, self.tok)
        return self._ids[name][:limit] if limit else self._ids[name]

    def windows(self, key: str, nsamples: int) -> dict:
        """Calibration windows (nsamples, seqlen) of a MIXES / SPECS key, with label, sha256 and seconds."""
        t0, label = time.perf_counter(), key
        if key in MIXES:
            parts = [(self.ids(name), w) for name, w in MIXES[key]]
            windows = corpus.mixed_calibration_windows(parts, nsamples, self.seqlen, self.seed)
        elif self.tok is None:
            raise ValueError(f"calibration {key!r} ({SPECS[key]}) needs a tokenizer: run without --quick")
        elif "self@" in SPECS[key]:
            windows = self.variant_windows(SPECS[key], nsamples)
            label = f"{SPECS[key]} (SELF_VARIANTS {SELF_VARIANTS})"
        else:  # the package's own path, as --calib SPEC
            cfg = MPIFAConfig(nsamples=nsamples, seqlen=self.seqlen, seed=self.seed)
            spec = SPECS[key].format(wiki=self.src["calib_wiki"])
            windows, label = calibration_windows_for(spec, self.tok, cfg, model=self.model, progress=False)
        out = {"calibration": windows, "calib_s": round(time.perf_counter() - t0, 1)}
        return out | {"calibration_label": label, "calibration_sha256": windows_sha256(windows)}

    def variant_windows(self, spec: str, nsamples: int) -> torch.Tensor:
        from leanformers.compression.self_calibration import SelfCalibrationSettings, self_calibration_windows

        mix = corpus.parse_sources(spec.format(wiki=self.src["calib_wiki"]))
        parts = []
        for i, ((src, _), count) in enumerate(zip(mix, corpus.window_counts([w for _, w in mix], nsamples))):
            if src.startswith("self@"):
                settings = SelfCalibrationSettings(**SELF_VARIANTS[src[len("self@") :]])
                args = (self.model, self.tok, count, self.seqlen, self.seed + i, settings)
                parts.append(self_calibration_windows(*args, progress=False)[0])
            else:
                ids = corpus.tokenize_text(corpus.load_text(src), self.tok)
                parts.append(corpus.calibration_windows(ids, count, self.seqlen, self.seed + i))
        return torch.cat(parts)

    def perplexities(self, model: nn.Module, tokens: int, context: int) -> dict:
        """text -> {ppl, tokens (predicted), s}, then the validation texts' mean log perplexity."""
        out = {}
        for name in (*VALIDATION, *TEST):
            t0, ids = time.perf_counter(), self.ids(name, tokens)
            res = perplexity(model, None, ids, seqlen=context, batch_size=1, progress=False)
            out[name] = {"ppl": round(res.ppl, 4), "tokens": res.n_tokens}
            out[name]["s"] = round(time.perf_counter() - t0, 1)
        val = sum(math.log(out[t]["ppl"]) for t in VALIDATION) / len(VALIDATION)
        return {"ppl": out, "validation_log_ppl": round(val, 4)}


def facts(model: nn.Module, base: nn.Module, tok, cache: dict) -> dict:
    """The factual-answer check (leanformers.eval.facts): greedy chat answers, 16 new tokens."""
    from leanformers.eval.facts import FACTS, fact_check, greedy_answers

    questions = [q for q, _ in FACTS]
    cache["dense"] = cache.get("dense") or greedy_answers(base, tok, questions, max_new_tokens=16)
    check = fact_check(cache["dense"], greedy_answers(model, tok, questions, max_new_tokens=16))
    return {**check.to_dict(), "summary": check.summary()}


def heal(
    model: nn.Module, base: nn.Module, tok, tokens: int, seqlen: int, seed: int, calibration: str, lr=None
) -> dict:
    """Healing by distillation (compressors/healing.py) on ``calibration`` text in place; lr None: default."""
    from leanformers.compressors import healing

    rate = {} if lr is None else {"learning_rate": lr}
    cfg = healing.HealingConfig(tokens=tokens, seqlen=seqlen, seed=seed, calibration=calibration, **rate)
    report = {k: v for k, v in healing.heal(model, base, tok, cfg).to_dict().items() if k != "config"}
    settings = {k: getattr(cfg, k) for k in ("batch_size", "gradient_accumulation", "learning_rate")}
    return report | {"settings": settings}


def series(cells: list[dict], **want) -> list[tuple[float, dict]]:
    """(density, ppl by text) of the cells matching ``want`` (cells before issue 20 lack seqlen, seed and
    heal_tokens: 512, 0, 0)."""
    defaults = {"seqlen": 512, "seed": 0, "heal_tokens": 0}
    chosen = [c for c in cells if all(c.get(k, defaults.get(k)) == v for k, v in want.items())]
    points = [(c["density"], {t: v["ppl"] for t, v in c["ppl"].items()}) for c in chosen]
    return sorted(points, key=lambda x: x[0])


def plot(path: Path, default_calib: str = "self_t1_own") -> None:
    """Perplexity vs density on WikiText-2 and two out-of-domain texts from the committed JSON of §14
    (SVD-LLM, 2:4) and §19/§20 (the OWL defaults, healed with the most tokens at 0.5 and 0.8; before OWL)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    old = json.loads((RESULTS / "mpifa_robustness.json").read_text())["cells"]
    new = json.loads((RESULTS / "mpifa_calibration.json").read_text())["cells"]
    owl = json.loads((RESULTS / "mpifa_owl_density.json").read_text())["cells"]
    me = dict(row="default", calibration=default_calib, nsamples=32)
    extra = [json.loads(f.read_text()).get("cells", []) for f in sorted(RESULTS.glob("mpifa_healing_*.json"))]
    cells = sum(extra, new)
    runs = [c for c in cells if me.items() <= c.items() and c.get("heal_tokens") and c["config"].get("owl")]
    runs = [c for c in runs if c["healing"]["kl_after"] < c["healing"]["kl_before"]]  # what heal() keeps
    at = {d: {c["heal_tokens"] for c in runs if c["density"] == d} for d in (0.5, 0.8)}
    heal = max(at[0.5] & at[0.8], default=0)  # the most tokens healed at both densities
    runs = [c for c in runs if c["heal_tokens"] == heal]
    best = {c["density"]: c for c in sorted(runs, key=lambda c: -c["validation_log_ppl"])}  # validation picks
    healed = series(list(best.values()), heal_tokens=heal)
    rates = "/".join(f"{best[d]['healing']['settings']['learning_rate']:g}" for d, _ in healed)
    lines = [
        (f"MPIFA, defaults (OWL, calibration {default_calib})", series(owl, **me, heal_tokens=0), "C0", "o-"),
        (f"MPIFA, defaults + healing ({heal:,} tokens, lr {rates})", healed, "C4", "*-"),
        ("MPIFA before OWL (stop 31's defaults)", series(new, **me, heal_tokens=0), "C7", "s:"),
        ("SVD-LLM whitening + U (WikiText)", series(old, row="svdllm_u"), "C3", "^-"),
        ("2:4 Wanda (WikiText, not healed)", series(old, row="wanda24"), "C2", "D"),
        ("2:4 SparseGPT (WikiText, not healed)", series(old, row="sparsegpt24"), "C1", "P"),
        ("2:4 SparseGPT (default windows, not healed)", series(cells, row="sparsegpt24_default"), "C5", "X"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    titles = {"wiki": "WikiText-2 raw test", "shakespeare": "Tiny Shakespeare", "stdlib": "Python stdlib"}
    for ax, (text, title) in zip(axes, titles.items()):
        for label, points, color, style in (line for line in lines if line[1]):
            ax.plot([d for d, _ in points], [v[text] for _, v in points], style, color=color, label=label)
        ax.axhline(series(old, row="dense")[0][1][text], color="k", lw=0.8, ls="--", label="dense")
        ax.set(title=title, xlabel="density of the targeted linears", yscale="log", xlim=(0.47, 0.93))
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("perplexity (first 8,192 tokens, context 2048)")
    axes[0].legend(fontsize=7.5, loc="upper right")
    fig.suptitle("SmolLM2-135M-Instruct: perplexity vs density (bench/compression_table.py --texts --plot)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
