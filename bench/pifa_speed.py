"""PIFA layer and model speed and memory (docs/benchmarks.md §2, §18): rows in bench/rows/pifa_speed.yaml.

  python bench/pifa_speed.py                                   # GPU: layers + end_to_end, fp16 and bf16
  python bench/pifa_speed.py --rows layers --set "dtypes=[float16]"
  python bench/pifa_speed.py --rows memory                     # saved bytes per layer (any machine)
  python bench/pifa_speed.py --rows checkpoints --threads 1    # §18 compressed SmolLM2 checkpoints (CPU)
  python bench/pifa_speed.py --rows profile --set compile=true # §18 a PIFA forward op by op (CPU)
  python bench/pifa_speed.py --rows load_memory                # §18 peak RSS of from_pretrained
  python bench/pifa_speed.py --quick                           # layers + end_to_end, small, CPU (seconds)

Row kinds (layers, end_to_end, memory, checkpoints, profile, load_memory): the rows file's header.
Each row prints its table; the rows of one ``output`` share bench/results/<output>[_quick].json.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import harness
import torch
import torch.nn.functional as F
from harness import in_fresh_process, interleaved, load_rows, print_table, timed
from torch import nn

from leanformers.storage.layers import CompressedLinear, LowRankLinear, PIFALinear
from leanformers.storage.pifa_linear import auto_form, emit_in_order_
from leanformers.storage.rank import lowrank_rank, pifa_rank

KINDS = {
    "layers": "dtypes shapes tokens reps",
    "memory": "dtype shapes",
    "load_memory": "model density paths",
    "end_to_end": "dtypes model prefill new_tokens decode reps",
    "profile": "dtypes shapes tokens reps cold compile",
    "checkpoints": "model dtypes variants measures prefill prompt_lengths new_tokens calibration reps",
}
KINDS["checkpoints"] += " rss_variants"
ROWS = load_rows("pifa_speed", lambda name, row: {"kind", "output", "quick", *KINDS[row["kind"]].split()})


# ---------------------------------------------------------------------------------------------- layers
def reference_forward(layer: PIFALinear) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reference implementation's forward of ``layer``: two GEMMs, then two scatters into the output."""
    f = layer.factors()  # row form
    pivots, nonpivots = f.pivots.long(), f.nonpivots.long()

    def forward(x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, layer.weight)
        out = x.new_empty(*x.shape[:-1], layer.out_features).index_copy_(-1, pivots, z)
        return out.index_copy_(-1, nonpivots, F.linear(z, layer.coeff))  # the layers here have no bias

    return forward


@torch.no_grad()
def random_pifa(m: int, n: int, r: int, form: str, dtype, device, seed: int = 0, sliced: bool = False):
    """A (out m, in n) PIFA layer of rank r, random factors and pivots (speed does not depend on the
    values); ``sliced``: the column form reading pivot-first input (no index op)."""
    g = torch.Generator().manual_seed(seed)
    layer = PIFALinear(n, m, r, bias=False, form="column" if sliced else form, dtype=dtype, device=device)
    perm = torch.randperm(m if layer.form == "row" else n, generator=g)
    perm = torch.cat([torch.sort(perm[:r]).values, torch.sort(perm[r:]).values])
    layer._index.copy_(torch.argsort(perm) if layer.form == "row" else perm)
    layer.weight.normal_(0, 0.02)
    layer.coeff.normal_(0, 0.02)
    layer.input_permuted = sliced
    return layer


@torch.no_grad()
def random_lowrank(m: int, n: int, r: int, dtype, device) -> LowRankLinear:
    layer = LowRankLinear(n, m, r, bias=False, dtype=dtype, device=device)
    layer.weight.normal_(0, 0.02)
    layer.weight_in.normal_(0, 0.02)
    return layer


def layer_modules(m: int, n: int, dtype, device) -> dict[str, Callable]:
    """The modules the layers row compares for one shape (the module docstring)."""
    half, r_lr, r_pifa = min(m, n) // 2, lowrank_rank(m, n, 0.5), pifa_rank(m, n, 0.5)
    row = random_pifa(m, n, half, "row", dtype, device)
    return {
        "dense": nn.Linear(n, m, bias=False, dtype=dtype, device=device),
        "lowrank r/d=.5": random_lowrank(m, n, half, dtype, device),
        "pifa-ref r/d=.5": reference_forward(row),
        "pifa-row r/d=.5": row,
        "pifa-col r/d=.5": random_pifa(m, n, half, "column", dtype, device),
        "pifa-slice r/d=.5": random_pifa(m, n, half, "column", dtype, device, sliced=True),
        "lowrank@0.5": random_lowrank(m, n, r_lr, dtype, device),
        "pifa@0.5": random_pifa(m, n, r_pifa, auto_form(m, n), dtype, device),
        "pifa-slice@0.5": random_pifa(m, n, r_pifa, "column", dtype, device, sliced=True),
    }


def cuda_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured once in a CUDA graph (decode sizes are launch-bound); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def us_per_call(fns: dict[str, Callable[[], object]], reps: int, device, inner: int = 1) -> dict[str, float]:
    """Median microseconds per call, the functions interleaved; ``inner`` calls between two clock reads."""
    calls = {k: lambda rep, f=f: [f() for _ in range(inner)] for k, f in fns.items()}
    return {k: statistics.median(v) * 1e6 / inner for k, v in interleaved(calls, reps, 3, device).items()}


@torch.no_grad()
def layers(s: dict, args) -> tuple[dict, list[dict]]:
    raw, cuda = [], args.device.type == "cuda"
    for dtype, (m, n) in ((d, shape) for d in s["dtypes"] for shape in s["shapes"]):
        modules = layer_modules(m, n, getattr(torch, dtype), args.device)
        for tokens in s["tokens"]:
            x = torch.randn(tokens, n, dtype=getattr(torch, dtype), device=args.device)
            graphs = cuda and tokens <= 16
            fns = {k: lambda mod=mod, x=x: mod(x) for k, mod in modules.items()}
            fns = {k: cuda_graph(f) for k, f in fns.items()} if graphs else fns
            us = us_per_call(fns, s["reps"], args.device, (20 if graphs else 5) if cuda else 1)
            key = {"dtype": dtype, "shape": f"{m}x{n}", "tokens": tokens}
            raw += [key | {"row": k, "us": v, "cuda_graph": graphs} for k, v in us.items()]
        del modules
        if cuda:
            torch.cuda.empty_cache()
    summary = summarise_layers(raw)
    prefill = [x for x in summary if x["tokens"] == s["tokens"][0]]
    decode = [x for x in summary if x["tokens"] != s["tokens"][0]]
    targets = {
        "PIFA >= 1.25x low-rank at r/d = 0.5, every shape (prefill)": (prefill, "pifa_vs_lowrank", 1.25),
        "PIFA >= 1.5x dense at density 0.5 (prefill)": (prefill, "pifa_vs_dense@0.5", 1.5),
        "PIFA >= 1.3x dense at density 0.5 (decode, 1-16 tokens)": (decode, "pifa_vs_dense@0.5", 1.3),
    }
    targets = {k: all(x[key] >= bound for x in rows) for k, (rows, key, bound) in targets.items()}
    return {"layers": raw, "summary": summary, "targets": targets}, summary


def summarise_layers(raw: list[dict]) -> list[dict]:
    """Per (dtype, shape, tokens): the times and the ratios the targets are stated in."""
    keyed: dict[tuple, dict[str, float]] = {}
    for r in raw:
        keyed.setdefault((r["dtype"], r["shape"], r["tokens"]), {})[r["row"]] = r["us"]
    out = []
    for (dtype, shape, tokens), t in keyed.items():
        lr, ref, row, col, sl = (
            t[f"{k} r/d=.5"] for k in ("lowrank", "pifa-ref", "pifa-row", "pifa-col", "pifa-slice")
        )
        entry = {"dtype": dtype, "shape": shape, "tokens": tokens, "dense_us": t["dense"], "lowrank_us": lr}
        entry |= {"ref_us": ref, "row_us": row, "col_us": col, "slice_us": sl}
        entry |= {"pifa_vs_lowrank": lr / min(row, col), "slice_vs_lowrank": lr / sl}
        entry["ref_vs_lowrank"] = lr / ref
        entry["pifa_vs_dense@0.5"] = t["dense"] / min(t["pifa@0.5"], t["pifa-slice@0.5"])
        entry["lowrank_vs_dense@0.5"] = t["dense"] / t["lowrank@0.5"]
        out.append(entry)
    return out


def state_bytes(module: nn.Module) -> int:
    """Bytes of everything ``save_pretrained`` stores for ``module`` (its state_dict tensors)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def memory(s: dict, args) -> tuple[dict, list[dict]]:
    """Saved bytes of dense / low-rank / PIFA layers at r = min(m, n) / 2 (meta device: counts only)."""
    rows, kw = [], {"bias": False, "dtype": getattr(torch, s["dtype"]), "device": "meta"}
    for m, n in s["shapes"]:
        r = min(m, n) // 2
        row = {"shape": f"{m}x{n}", "dtype": s["dtype"], "rank": r}
        row["dense_bytes"] = state_bytes(nn.Linear(n, m, **kw))
        row["lowrank_bytes"] = state_bytes(LowRankLinear(n, m, r, **kw))
        for form in ("row", "column"):
            row[f"pifa_{form}_bytes"] = state_bytes(PIFALinear(n, m, r, form=form, **kw))
        row["pifa_bytes"] = min(row["pifa_row_bytes"], row["pifa_column_bytes"])  # the best form
        rows.append(row | {"pifa_saving_vs_lowrank": 1 - row.pop("pifa_bytes") / row["lowrank_bytes"]})
    total_lr = sum(r["lowrank_bytes"] for r in rows)
    total_pifa = sum(min(r["pifa_row_bytes"], r["pifa_column_bytes"]) for r in rows)
    total = {"shape": "all shapes", "lowrank_bytes": total_lr}
    rows.append(total | {"pifa_saving_vs_lowrank": 1 - total_pifa / total_lr})
    return {"memory": rows}, rows


# ---------------------------------------------------------------------------------------------- end to end
def random_llama(shape: dict, dtype, device, layout: str = "dense", density=0.5, positions=4096):
    """A random LLaMA of ``shape``; layout mpifa / lowrank: every block linear a random PIFA (the MPIFA
    layout) or U V layer at ``density`` (the values do not affect speed)."""
    from transformers import LlamaForCausalLM

    cfg = harness.llama_config(**shape, max_positions=positions, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    for i, block in enumerate(model.model.layers if layout != "dense" else []):
        for j, (name, old) in enumerate([(k, v) for k, v in block.named_modules() if type(v) is nn.Linear]):
            m, n = old.out_features, old.in_features
            if layout == "lowrank":
                new = random_lowrank(m, n, lowrank_rank(m, n, density), dtype, device)
            else:
                form = "column" if name.endswith("down_proj") else auto_form(m, n)
                new = random_pifa(m, n, pifa_rank(m, n, density), form, dtype, device, seed=31 * i + j)
            block.set_submodule(name, new)
        if layout == "mpifa":  # gate / up emit down_proj's pivot order: its input needs no gather
            emit_in_order_([block.mlp.gate_proj, block.mlp.up_proj], block.mlp.down_proj)
    return model


def peak_gib(device, reset: bool = False) -> float | None:
    if device.type != "cuda":
        return None
    if reset:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated() / 2**30


@torch.no_grad()
def model_speed(model, s: dict, device, compiled: bool | None) -> dict:
    """Prefill tokens/s (one forward of ``prefill`` tokens, no cache) and decode tokens/s (generate, batch
    1, greedy: ``new_tokens`` minus the first one's time); ``compiled`` None: prefill only, True: static
    cache, which generate compiles (CUDA graphs), False: eager with the dynamic cache."""
    ids = torch.randint(0, model.config.vocab_size, (1, s["prefill"]), device=device)
    peak_gib(device, reset=True)
    forward = {"prefill": lambda rep: model(input_ids=ids, use_cache=False, logits_to_keep=1)}
    prefill_s = statistics.median(interleaved(forward, s["reps"], warmup=1, device=device)["prefill"])
    out = {"prefill_tok_s": s["prefill"] / prefill_s, "peak_prefill_gib": peak_gib(device)}
    out |= {"decode_tok_s": None, "decode_mode": "not run", "peak_decode_gib": None}
    out["params"] = sum(p.numel() for p in model.parameters())
    if compiled is None:
        return out
    prompt, new = ids[:, :32], s["new_tokens"]
    kw = {"do_sample": False, "min_new_tokens": new, "max_new_tokens": new}
    kw |= {"cache_implementation": "static"} if compiled else {}
    mode = "static cache + compile" if compiled else "eager, dynamic cache"
    try:
        model.generate(prompt, **kw)  # warm-up / compilation
    except Exception as exc:  # keep the numbers honest: fall back to eager decoding and say so
        kw.pop("cache_implementation", None)
        mode = f"eager (compiled decode failed: {type(exc).__name__}: {str(exc)[:120]})"
        model.generate(prompt, **kw)
    peak_gib(device, reset=True)
    one = {**kw, "min_new_tokens": 1, "max_new_tokens": 1}
    calls = {"first": lambda rep: model.generate(prompt, **one)}
    calls["all"] = lambda rep: model.generate(prompt, **kw)
    t = {k: statistics.median(v) for k, v in interleaved(calls, s["reps"], device=device).items()}
    out |= {"decode_tok_s": (new - 1) / max(t["all"] - t["first"], 1e-9), "decode_mode": mode}
    return out | {"peak_decode_gib": peak_gib(device)}


def end_to_end(s: dict, args) -> tuple[dict, list[dict]]:
    decode = {"auto": args.device.type == "cuda", "compiled": True, "eager": False, "none": None}[s["decode"]]
    mode = {None: "not run", True: "static cache + compile", False: "eager"}[decode]
    out = {"prefill_tokens": s["prefill"], "decode_tokens": 0 if decode is None else s["new_tokens"]}
    out |= {"decode_mode": mode, "runs": {}, "speedups": [], "pifa_vs_lowrank": []}
    table = []
    for dtype in s["dtypes"]:
        runs = out["runs"][dtype] = {}
        for name in ("dense", "mpifa@0.5", "lowrank@0.5"):
            layout, positions = name.split("@")[0], max(s["prefill"], 1024)
            model = random_llama(s["model"], getattr(torch, dtype), args.device, layout, positions=positions)
            runs[name] = model_speed(model, s, args.device, decode)
            del model
            peak_gib(args.device, reset=True)
            table.append({"dtype": dtype, "model": name, **runs[name]})

        for a, b in (("mpifa@0.5", "dense"), ("lowrank@0.5", "dense"), ("mpifa@0.5", "lowrank@0.5")):
            ratio = {"dtype": dtype, "prefill": runs[a]["prefill_tok_s"] / runs[b]["prefill_tok_s"]}
            ratio["decode"] = None if decode is None else runs[a]["decode_tok_s"] / runs[b]["decode_tok_s"]
            if b == "dense":
                out["speedups"].append(ratio | {"variant": a})
            else:
                out["pifa_vs_lowrank"].append(ratio)
    mpifa = [x for x in out["speedups"] if x["variant"] == "mpifa@0.5"]
    out["targets"] = {
        "MPIFA >= 1.4x dense, end-to-end prefill at 0.5": {x["dtype"]: x["prefill"] >= 1.4 for x in mpifa},
        "MPIFA >= 1.3x dense, decode at 0.5": {x["dtype"]: (x["decode"] or 0) >= 1.3 for x in mpifa},
    }
    return {"end_to_end": out}, table + out["speedups"]


# ---------------------------------------------------------------------------------------------- profile
def forward_ops(layer: PIFALinear, x2: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The forward of ``layer`` on (T, in) ``x2`` split into its operations, each a call on inputs prepared
    in advance (so that each times one op and its own dispatch)."""
    r, cd = layer.rank, torch.promote_types(x2.dtype, layer.coeff.dtype)
    coeff = layer.coeff.to(cd)  # C stored wider than x: the casts are part of the forward
    if layer.form == "column":
        xp = x2.index_select(1, layer.input_index)
        head, tail = xp[:, :r].to(cd), xp[:, r:].to(cd)
        z = torch.addmm(head, tail, coeff.t()).to(x2.dtype)
        ops = {"gather": lambda: x2.index_select(1, layer.input_index)}
        ops["coeff GEMM"] = lambda: torch.addmm(head, tail, coeff.t())
        ops["weight GEMM"] = lambda: F.linear(z, layer.weight, layer.bias)
        casts = lambda: (xp[:, :r].to(cd), xp[:, r:].to(cd), layer.coeff.to(cd), z.to(x2.dtype))  # noqa: E731
    else:
        z = F.linear(x2, layer.weight)
        zc = F.linear(z.to(cd), coeff).to(z.dtype)
        y = torch.cat([z, zc], dim=-1)
        ops = {"weight GEMM": lambda: F.linear(x2, layer.weight)}
        ops["coeff GEMM"] = lambda: F.linear(z.to(cd), coeff)
        ops["cat"] = lambda: torch.cat([z, zc], dim=-1)
        ops["gather"] = lambda: y.index_select(1, layer.output_index)
        if layer.bias is not None:
            ops["bias"] = lambda: y.add(layer.bias)
        casts = lambda: (z.to(cd), layer.coeff.to(cd), zc.to(z.dtype))  # noqa: E731
    return ops | ({"casts": casts} if cd != x2.dtype else {})


def cycle(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """One callable running the next of ``fns`` at each call."""
    calls = itertools.cycle(fns)
    return lambda: next(calls)()


COLD_BYTES = 96 * 2**20  # > 2x a 32 MB L3: cycling through this many bytes of copies reads from DRAM


def profile_layers(m: int, n: int, r: int, dtype, cold: bool) -> dict[str, list[nn.Module]]:
    """Per layout, copies of its layer (other seeds) whose weights together exceed the caches when ``cold``:
    at batch 1 a model's layers stream from DRAM, and one small layer timed over and over stays in cache."""
    builds = {
        "dense": lambda seed: nn.Linear(n, m, bias=False, dtype=dtype),
        "lowrank": lambda seed: random_lowrank(m, n, r, dtype, "cpu"),
        "pifa-row": lambda seed: random_pifa(m, n, r, "row", dtype, "cpu", seed),
        "pifa-col": lambda seed: random_pifa(m, n, r, "column", dtype, "cpu", seed),
        "pifa-slice": lambda seed: random_pifa(m, n, r, "column", dtype, "cpu", seed, sliced=True),
    }
    for form in ("row", "column") if dtype == torch.bfloat16 else ():  # C in bf16: no fp32 product, no cast
        builds[f"pifa-{form[:3]} same-C"] = lambda seed, form=form: random_pifa(
            m, n, r, form, dtype, "cpu", seed
        ).set_coefficient_dtype_("same")
    copies = -(-COLD_BYTES // state_bytes(builds["dense"](0))) if cold else 1
    return {name: [build(i) for i in range(copies)] for name, build in builds.items()}


def compile_row(modules: dict[str, nn.Module], x: torch.Tensor, reps: int) -> dict:
    """torch.compile of each layer alone (inductor): the first call's time (the compile) and the steady
    state next to eager."""
    out = {}
    for name, module in modules.items():
        torch._dynamo.reset()
        compiled = torch.compile(module, dynamic=False)
        try:
            with timed() as first:
                compiled(x)
        except Exception as exc:  # no C++ toolchain, an unsupported op: recorded, not fatal
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            continue
        us = us_per_call({"eager": lambda m=module: m(x), "compiled": lambda c=compiled: c(x)}, reps, "cpu")
        out[name] = {"compile_s": first.seconds, "eager_us": us["eager"], "compiled_us": us["compiled"]}
    torch._dynamo.reset()
    return out


@torch.no_grad()
def profile(s: dict, args) -> tuple[dict, list[dict]]:
    """Per shape and token count: dense, U V and the PIFA layouts at one rank, each PIFA forward also split
    into its ops and run as the previous commit's forward (tests/storage/test_forward.py)."""
    from tests.storage.test_forward import previous_forward

    rows, table, load_before = [], [], os.getloadavg()
    for dtype, (m, n, *density) in ((getattr(torch, d), shape) for d in s["dtypes"] for shape in s["shapes"]):
        r = pifa_rank(m, n, density[0]) if density else min(m, n) // 2
        for tokens in s["tokens"]:
            layers = profile_layers(m, n, r, dtype, cold=s["cold"] and tokens == 1)
            x = torch.randn(1, tokens, n, dtype=dtype)
            fns = {k: cycle([lambda mod=mod, x=x: mod(x) for mod in mods]) for k, mods in layers.items()}
            for form in ("row", "col"):
                mods = layers[f"pifa-{form}"]
                previous = [lambda mod=mod, x=x: previous_forward(mod, x) for mod in mods]
                fns[f"pifa-{form} previous"] = cycle(previous)
                per_copy = [forward_ops(mod, x.reshape(-1, n)) for mod in mods]
                fns |= {f"pifa-{form}: {op}": cycle([ops[op] for ops in per_copy]) for op in per_copy[0]}
            reps = max(3, s["reps"] // 4) if m * n * tokens > 2**26 else s["reps"]
            us = us_per_call(fns, reps, "cpu")
            row = {"dtype": str(dtype)[6:], "shape": f"{m}x{n}", "rank": r, "tokens": tokens}
            row |= {"copies": len(mods), "us": us}
            for f in ("row", "col"):
                ops = sum(v for k, v in us.items() if k.startswith(f"pifa-{f}: "))
                row[f"pifa-{f} overhead_us"] = us[f"pifa-{f}"] - ops
            best = min(us["pifa-row"], us["pifa-col"])
            row |= {"pifa_vs_lowrank": us["lowrank"] / best, "pifa_vs_dense": us["dense"] / best}
            if "pifa-row same-C" in us:
                same_c = min(us["pifa-row same-C"], us["pifa-col same-C"])
                row["pifa_same_c_vs_lowrank"] = us["lowrank"] / same_c
            row["new_vs_previous"] = {f: us[f"pifa-{f} previous"] / us[f"pifa-{f}"] for f in ("row", "col")}
            if s["compile"]:
                first = {k: layers[k][0] for k in ("dense", "lowrank", "pifa-row", "pifa-col")}
                row["compile"] = compile_row(first, x, reps)
            rows.append(row)
            cells = ("dtype", "shape", "rank", "tokens", "pifa_vs_lowrank", "pifa_vs_dense")
            layouts = ("dense", "lowrank", "pifa-row", "pifa-col")
            table.append({k: row[k] for k in cells} | {k: us[k] for k in layouts})
    load = {"loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    return {"profile": rows, "environment": load}, table


# ---------------------------------------------------------------------------------------------- checkpoints
SAME_COEFF = "/same-C"  # the checkpoint named before it, loaded with coefficient_dtype="same"


def variant_config(name: str, calibration: list[int]):
    """MPIFA (PIFA layers), MPIFA with U V output (the low-rank model of equal parameters) or 2:4 Wanda."""
    from leanformers import MPIFAConfig, WandaConfig

    common = {"nsamples": calibration[0], "seqlen": calibration[1], "batch_size": 4, "device": "cpu"}
    method, _, density = name.removesuffix(SAME_COEFF).partition("@")
    if method == "2:4" and not density:
        return WandaConfig(**common)
    if method not in ("mpifa", "lowrank") or not density:
        raise SystemExit(f"unknown variant {name!r}: dense, mpifa@D, lowrank@D, 2:4 (+ {SAME_COEFF})")
    return MPIFAConfig(density=float(density), output="pifa" if method == "mpifa" else "lowrank", **common)


def compressed_folder(source: Path, name: str, calibration, label: str, s: dict, cache: Path) -> dict:
    """Folder of ``source`` compressed as ``name`` says, made once and reused from ``cache`` (the key, hashed
    into the folder's name, covers everything the compressed tensors depend on)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leanformers import __version__, compress, save_compressed

    name = name.removesuffix(SAME_COEFF)
    if name == "dense":
        return {"folder": str(source), "compress_s": 0.0}
    key = hashlib.sha256(json.dumps([str(source), name, *s["calibration"], label, __version__]).encode())
    folder = cache / f"{name.replace('@', '-').replace(':', '-')}-{key.hexdigest()[:12]}"
    if (folder / "config.json").is_file():
        return {"folder": str(folder), "compress_s": None, "cached": True}
    tokenizer = AutoTokenizer.from_pretrained(source) if (source / "tokenizer.json").is_file() else None
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with timed() as t:
        compress(model, tokenizer, variant_config(name, s["calibration"]), calibration)
    save_compressed(model, tokenizer, folder)  # atomic: a stopped run leaves no half folder
    print(f"compressed {name} in {t.seconds:.0f} s -> {folder}", file=sys.stderr, flush=True)
    return {"folder": str(folder), "compress_s": t.seconds, "cached": False}


def targeted(model: nn.Module) -> list[nn.Module]:
    """The linears MPIFA targets by default: every linear / compressed layer inside the decoder blocks."""
    return [m for m in model.model.layers.modules() if isinstance(m, (nn.Linear, CompressedLinear))]


def kept_share(model: nn.Module) -> float:
    """Stored weights of the targeted linears over their dense count (1.0 for dense kernels: 2:4 too)."""
    mods = targeted(model)
    stored = sum(getattr(m, "num_parameters", m.in_features * m.out_features) for m in mods)
    return stored / sum(m.in_features * m.out_features for m in mods)


class LinearClock:
    """Wall time spent inside the targeted linears (forward hooks) over a ``with`` block."""

    def __init__(self, model: nn.Module) -> None:
        self.modules, self.seconds, self.starts = targeted(model), 0.0, {}

    def pre(self, module, args) -> None:
        self.starts[id(module)] = time.perf_counter()

    def post(self, module, args, output) -> None:
        self.seconds += time.perf_counter() - self.starts.pop(id(module))

    def __enter__(self) -> LinearClock:
        self.handles = [m.register_forward_pre_hook(self.pre) for m in self.modules]
        self.handles += [m.register_forward_hook(self.post) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def checkpoint_inputs(s: dict, tokenizer, vocab: int) -> dict:
    """The prompts (for batch 1, and left-padded into one batch of 8) and the prefill windows."""
    lengths, longest = s["prompt_lengths"], max(s["prefill"])
    if tokenizer is None:
        ids = torch.randint(0, vocab, (longest + sum(lengths),), generator=torch.Generator().manual_seed(0))
    else:
        from leanformers.data import load_text, shared_data_path, tokenize_text

        text = load_text(str(shared_data_path("wikitext-2-raw-test.txt")))
        ids = tokenize_text(text[: 40 * (longest + sum(lengths))], tokenizer).flatten()
    prompts = [ids[longest + sum(lengths[:i]) :][:n].clone() for i, n in enumerate(lengths)]
    pad = 0 if tokenizer is None else tokenizer.pad_token_id
    pad = tokenizer.eos_token_id if pad is None else pad
    batch = torch.full((len(prompts), max(lengths)), pad, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):  # left padding, as generate expects for decoder-only models
        batch[i, batch.shape[1] - len(p) :], mask[i, batch.shape[1] - len(p) :] = p, 1
    prefill = {n: ids[:n].unsqueeze(0) for n in s["prefill"]}
    return {"prompts": prompts, "batch": batch, "mask": mask, "pad": pad, "prefill": prefill}


def measure_call(model, measure: str, rep: int, inputs: dict, new: int) -> tuple[int, torch.Tensor | None]:
    """One call of ``measure``: (tokens it counts, new tokens). decode: batch 1, prompt ``rep`` mod 8;
    batch8: the 8 prompts left-padded; prefillN: one forward of N tokens, no cache, the last logits."""
    if measure.startswith("prefill"):
        n = int(measure.removeprefix("prefill"))
        model(input_ids=inputs["prefill"][n], use_cache=False, logits_to_keep=1)
        return n, None
    ids = inputs["prompts"][rep % len(inputs["prompts"])][None] if measure == "decode" else inputs["batch"]
    mask = torch.ones_like(ids) if measure == "decode" else inputs["mask"]
    kw = {"do_sample": False, "max_new_tokens": new, "min_new_tokens": new, "pad_token_id": inputs["pad"]}
    out = model.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1] :]
    return out.numel(), out


def time_measure(models: dict, measure: str, reps: int, inputs: dict, new: int) -> dict:
    """Interleaved repeats, then one more call per model under the LinearClock (the share of its time in
    the targeted linears). The paired speed-up is the median of the per-repeat ratios dense / model."""
    counted, outputs = {}, {n: {} for n in models}
    for model in models.values():  # warm-up (allocator, first-call paths)
        measure_call(model, measure, 0, inputs, 2)

    def call(name: str) -> Callable[[int], None]:
        def run(rep: int) -> None:
            counted[name], out = measure_call(models[name], measure, rep, inputs, new)
            if out is not None:
                outputs[name][rep % len(inputs["prompts"])] = out

        return run

    times = interleaved({n: call(n) for n in models}, reps)
    rows, dense = {}, next(iter(models))
    for name, model in models.items():
        with LinearClock(model) as clock, timed() as total:
            measure_call(model, measure, 0, inputs, new)
        rows[name] = {"seconds": times[name], "tok_s": counted[name] / statistics.median(times[name])}
        rows[name]["profile"] = {"total_s": total.seconds, "linear_s": clock.seconds}
        rows[name]["profile"]["linear_share"] = clock.seconds / total.seconds
    for name, row in rows.items():
        row["speedup_vs_dense"] = row["tok_s"] / rows[dense]["tok_s"]
        row["paired_speedup_median"] = statistics.median(d / v for d, v in zip(times[dense], times[name]))
    return {"rows": rows, "outputs": outputs}


def batch_check(decode: dict, batch8: dict) -> dict:
    """Each row of the batch-8 (left-padded) output against the batch-1 output of the same prompt: the
    index of the first differing token, -1 when equal (None: that prompt did not run at batch 1)."""
    result = {}
    for name, single in decode.items():
        batch = batch8.get(name, {}).get(0)
        if batch is None:
            continue
        diffs = [None if i not in single else (single[i][0] != batch[i]).nonzero() for i in range(len(batch))]
        rows = [d if d is None else -1 if d.numel() == 0 else int(d[0, 0]) for d in diffs]
        checked = [r for r in rows if r is not None]
        result[name] = {"rows_checked": len(checked), "rows_equal": checked.count(-1), "first_mismatch": rows}
        result[name]["equal"] = bool(checked) and all(r == -1 for r in checked)
    return result


def checkpoint_targets(runs: list[dict], variants: dict) -> list[dict]:
    """Issue 21's CPU target per (dtype, threads, measure, variant): speed-up >= 0.9 x the ideal
    1 / ((1 - f) + f k), f the dense run's share of time in the targeted linears, k the kept share."""
    dense = {(r["dtype"], r["threads"], r["measure"]): r for r in runs if r["variant"] == "dense"}
    out = []
    for r in (r for r in runs if r["variant"] != "dense"):
        f = dense[(r["dtype"], r["threads"], r["measure"])]["profile"]["linear_share"]
        k, speedup = variants[r["variant"]]["kept_share"], r["paired_speedup_median"]
        ideal = 1.0 / ((1.0 - f) + f * k)
        target = {key: r[key] for key in ("dtype", "threads", "measure", "variant")}
        target |= {"linear_share_dense": f, "kept_share": k, "ideal": ideal, "speedup": speedup}
        target |= {"speedup_of_medians": r["speedup_vs_dense"], "of_ideal": speedup / ideal}
        out.append(target | {"met": speedup >= 0.9 * ideal})
    return out


def rss_probe(folder: str, dtype: str, new_tokens: int, load_kwargs: dict) -> dict:
    """Run in a fresh process: RSS after the imports, then the peak RSS (VmHWM) over ``from_pretrained``
    (with ``load_kwargs``), reading every tensor once (the load maps the file: its pages count once read)
    and one batch-1 generate of ``new_tokens`` (0: none)."""
    import psutil
    from transformers import AutoModelForCausalLM

    import leanformers  # noqa: F401  (the quantizer)
    from leanformers.compression.checkpoint_io import PeakHostMemory

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rss = psutil.Process().memory_info
    out = {"rss_after_imports": rss().rss}
    with PeakHostMemory() as peak, torch.no_grad():
        with timed() as load:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **load_kwargs)
        out |= {"rss_after_load": rss().rss, "peak_rss_load": peak.so_far()}
        for t in model.state_dict().values():
            t.sum()
        out["rss_after_reading_every_tensor"] = rss().rss
        if new_tokens:
            ids = torch.arange(1, 17).unsqueeze(0) % model.config.vocab_size
            model.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    out |= {"peak_rss": peak.peak, "peak_exact": peak.exact, "state_bytes": state_bytes(model)}
    return out | {"load_s": load.seconds, "load_kwargs": {k: str(v) for k, v in load_kwargs.items()}}


def checkpoint_source(s: dict, tmp: Path):
    """(source folder, tokenizer, calibration, its label, cache folder)."""
    from transformers import AutoTokenizer

    if s["model"] == "tiny":
        harness.tiny_llama(seed=0, layers=2, hidden=64, intermediate=96).save_pretrained(tmp / "tiny")
        calibration = torch.randint(0, 128, s["calibration"], generator=torch.Generator().manual_seed(0))
        return tmp / "tiny", None, calibration, "random ids", tmp / "cache"
    from leanformers.data import shared_data_path
    from leanformers.hub import cache_dir, smollm2_135m

    source, calib = smollm2_135m(), shared_data_path("wikitext-2-v1-valid.txt")
    return source, AutoTokenizer.from_pretrained(source), str(calib), calib.name, cache_dir() / "pifa_speed"


def checkpoints(s: dict, args) -> tuple[dict, list[dict]]:
    """Every variant compressed (cached), loaded with from_pretrained, timed interleaved per dtype."""
    from transformers import AutoModelForCausalLM

    from leanformers import MPIFAQuantizationConfig

    if s["variants"][0] != "dense":
        raise SystemExit("variants must start with dense (every speed-up is relative to it)")
    for name in s["variants"][1:]:
        variant_config(name, [1, 2])  # an unknown name is an error before anything runs
    measures = s["measures"] or ["decode", "batch8", *(f"prefill{n}" for n in s["prefill"])]
    res = {"new_tokens": s["new_tokens"], "prompt_lengths": s["prompt_lengths"], "runs": [], "load": {}}
    res |= {"batch8_equals_batch1": {}, "rss": {}}
    tmp = Path(tempfile.mkdtemp(prefix="pifa-speed-ckpt-"))
    try:
        source, tokenizer, calibration, label, cache = checkpoint_source(s, tmp)
        smollm2 = "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised)"
        res["source"] = smollm2 if tokenizer else "tiny LLaMA (random)"
        res["calibration"] = f"{label}: {s['calibration'][0]} x {s['calibration'][1]} tokens"
        variants = {n: compressed_folder(source, n, calibration, label, s, cache) for n in s["variants"]}
        res["variants"] = variants
        same = {"quantization_config": MPIFAQuantizationConfig(coefficient_dtype="same")}
        for dtype in s["dtypes"]:
            models = {}
            for name, v in variants.items():
                kw = {"dtype": getattr(torch, dtype), **(same if name.endswith(SAME_COEFF) else {})}
                models[name] = AutoModelForCausalLM.from_pretrained(v["folder"], **kw).eval()
                v["params"] = sum(p.numel() for p in models[name].parameters())
                v["kept_share"] = kept_share(models[name])
            inputs = checkpoint_inputs(s, tokenizer, models["dense"].config.vocab_size)
            load, cpu0, wall0, outputs = os.getloadavg(), time.process_time(), time.perf_counter(), {}
            with torch.no_grad():
                for measure in measures:
                    check = measure == "decode" and "batch8" in measures  # batch 1 runs every prompt once
                    reps = max(s["reps"], len(inputs["prompts"])) if check else s["reps"]
                    timed_rows = time_measure(models, measure, reps, inputs, s["new_tokens"])
                    outputs[measure] = timed_rows["outputs"]
                    key = {"dtype": dtype, "threads": torch.get_num_threads(), "measure": measure}
                    res["runs"] += [key | {"variant": n} | row for n, row in timed_rows["rows"].items()]
                    args.save_partial(res)  # a stopped run keeps its finished measures
            wall = time.perf_counter() - wall0
            share = (time.process_time() - cpu0) / wall / torch.get_num_threads()
            res["load"][dtype] = {"loadavg_before": load, "loadavg_after": os.getloadavg(), "wall_s": wall}
            res["load"][dtype]["cpu_share_of_wall"] = share
            if "decode" in outputs and "batch8" in outputs:
                res["batch8_equals_batch1"][dtype] = batch_check(outputs["decode"], outputs["batch8"])
            del models
        probed = s["variants"] if s["rss_variants"] is None else s["rss_variants"]
        for dtype, name in ((d, n) for d in s["dtypes"] for n in probed):
            kw = {"folder": variants[name]["folder"], "dtype": dtype, "new_tokens": 16, "load_kwargs": {}}
            res["rss"][f"{name} {dtype}"] = in_fresh_process("pifa_speed", "rss_probe", args.threads, **kw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["targets"] = checkpoint_targets(res["runs"], variants)
    ideal = {(t["dtype"], t["measure"], t["variant"]): t["ideal"] for t in res["targets"]}
    table = []
    for r in res["runs"]:
        table.append({k: r[k] for k in ("dtype", "measure", "variant", "tok_s", "paired_speedup_median")})
        table[-1]["ideal"] = ideal.get((r["dtype"], r["measure"], r["variant"]))
        table[-1]["f"] = r["profile"]["linear_share"]
    for dtype, check in res["batch8_equals_batch1"].items():
        equal = ", ".join(f"{n} {c['rows_equal']}/{c['rows_checked']}" for n, c in check.items())
        print(f"batch 8 (left-padded) == batch 1, {dtype}: {equal}")
    return {"checkpoints": res}, table


# ---------------------------------------------------------------------------------------------- load memory
LOAD_PATHS = {"default": {}, "low_cpu_mem_usage": {"low_cpu_mem_usage": True}}
LOAD_PATHS["device_map auto"] = {"device_map": "auto"}


@torch.no_grad()
def save_random_compressed(s: dict, folder: Path) -> dict:
    """A random LLaMA whose block linears are random PIFA layers at ``density`` (its dense linears exist only
    on the meta device), saved with save_compressed."""
    from leanformers import save_compressed

    model = random_llama(s["model"], torch.float32, "meta")
    built = {"dense_params": sum(p.numel() for p in model.parameters())}
    linears = [(k, v) for k, v in model.model.layers.named_modules() if isinstance(v, nn.Linear)]
    for i, (name, (m, n)) in enumerate((k, (v.out_features, v.in_features)) for k, v in linears):
        new = random_pifa(m, n, pifa_rank(m, n, s["density"]), auto_form(m, n), torch.float32, "cpu", seed=i)
        model.model.layers.set_submodule(name, new)
    g = torch.Generator().manual_seed(0)
    for module in (model.model.embed_tokens, model.lm_head):
        module.weight = nn.Parameter(torch.randn(module.weight.shape, generator=g) * 0.02)
    for module in (m for m in model.modules() if "norm" in type(m).__name__.lower()):
        module.weight = nn.Parameter(torch.ones(module.weight.shape))
    rotary = model.model.rotary_emb  # a non-persistent buffer, rebuilt on load; needed here for .to() only
    rotary.register_buffer("inv_freq", torch.zeros(rotary.inv_freq.shape), persistent=False)
    rotary.original_inv_freq = rotary.inv_freq
    save_compressed(model, None, folder)
    built |= {"config": model.config.to_dict(), "stored_params": sum(p.numel() for p in model.parameters())}
    return built | {"safetensors_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}


def load_memory(s: dict, args) -> tuple[dict, list[dict]]:
    """from_pretrained per loading path, in a fresh process each: its peak RSS against the safetensors
    size + the fixed overhead (the RSS after the imports); target <= 1.1x."""
    unknown = set(s["paths"]) - set(LOAD_PATHS)
    if unknown:
        raise SystemExit(f"load_memory paths: unknown {sorted(unknown)}; choose from {', '.join(LOAD_PATHS)}")
    tmp = Path(tempfile.mkdtemp(prefix="pifa-load-memory-"))
    try:
        built, rows = save_random_compressed(s, tmp / "model"), []
        for path in s["paths"]:
            kw = {"dtype": "float32", "new_tokens": 0, "load_kwargs": LOAD_PATHS[path]}
            probe = in_fresh_process("pifa_speed", "rss_probe", args.threads, folder=str(tmp / "model"), **kw)
            bound = probe["rss_after_imports"] + built["safetensors_bytes"]
            row = {"path": path, "safetensors_GB": built["safetensors_bytes"] / 1e9}
            row["rss_after_imports_GB"] = probe["rss_after_imports"] / 1e9
            row["peak_rss_GB"] = probe["peak_rss"] / 1e9
            row |= {"peak_over_size_plus_fixed": probe["peak_rss"] / bound, "load_s": probe["load_s"]}
            rows.append(row | {"met_1.1x": probe["peak_rss"] <= 1.1 * bound, "probe": probe})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"model": built, "rows": rows}, [{k: v for k, v in r.items() if k != "probe"} for r in rows]


# ---------------------------------------------------------------------------------------------- main
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f"}


def cpu_flags() -> dict:
    """The CPU model and the flags that decide bf16 speed (/proc/cpuinfo)."""
    info = {"model": None, "bf16_flags": []}
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    for key, _, value in (line.partition(":") for line in lines):
        if key.strip() == "model name" and info["model"] is None:
            info["model"] = value.strip()
        elif key.strip() == "flags":
            info["bf16_flags"] = sorted(set(value.split()) & BF16_FLAGS)
            break
    return info


MEASURE = {"layers": layers, "end_to_end": end_to_end, "memory": memory}
MEASURE |= {"checkpoints": checkpoints, "profile": profile, "load_memory": load_memory}


def build_parser():
    ap = harness.parser(__doc__, "the rows at their quick sizes (CPU, seconds)", "result JSON (one output)")
    harness.rows_arguments(ap, ROWS, default=["layers", "end_to_end"])
    device = "cuda or cpu (default cuda when available; cpu with --quick)"
    ap.add_argument("--device", default=None, help=device)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: stable on a shared CPU)")
    return ap


def main(argv: list[str] | None = None) -> dict:
    """Runs the rows; returns {output name: the payload written to its JSON}."""
    ap = build_parser()
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    args.device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available; use --quick on a CPU")
    settings = {name: harness.row_settings(name, ROWS[name], args.quick, args.sets) for name in args.rows}
    if args.output is not None and len({s["output"] for s in settings.values()}) > 1:
        ap.error("--output takes rows of one output (the rows file's output key)")
    env = harness.environment(args.device) | {"threads": args.threads, "quick": args.quick}
    env["cpu_flags"] = cpu_flags()
    payloads, threads = {}, torch.get_num_threads()
    torch.set_num_threads(args.threads)  # one by default: several spin against other jobs on a shared CPU
    torch.manual_seed(0)
    try:
        for name, s in settings.items():
            path = harness.output_path(args, s["output"])
            new = {"environment": env | {"dtypes": s.get("dtypes", [s.get("dtype")])}}
            payload = payloads.setdefault(path, new | {"command": harness.command_line("pifa_speed", argv)})
            args.save_partial = lambda part, p=payload, to=path: harness.write_json(to, p | {"partial": part})
            result, table = MEASURE[s["kind"]](s, args)
            payload["environment"] |= result.pop("environment", {})
            payload |= result
            harness.write_json(path, payload, indent=1)
            print(f"\n{name} (JSON: {path})")
            print_table(table)
    finally:
        torch.set_num_threads(threads)
    return {Path(p).stem: payload for p, payload in payloads.items()}


if __name__ == "__main__":
    main()
