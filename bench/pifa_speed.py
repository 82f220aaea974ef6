"""PIFA layer and model speed (BENCHMARKS.md section 2; issue 21 for the CPU parts).

Rows per shape (m x n = out x in), dtype and token count, all timed side by side in one run (on the
CPU interleaved within each repeat):
  dense            nn.Linear
  lowrank r/d=.5   U V at the rank PIFA gets at r/d = 0.5 (r = min(m, n) / 2)
  pifa-ref         the reference layer: two GEMMs + two index_copy_ output scatters
  pifa-row         PIFALinear row form (one output gather)
  pifa-col         PIFALinear column form (one input gather, fused addmm)
  pifa-slice       column form reading pivot-first input (no index op: upstream emits the order)
  and at density 0.5 (equal parameter count): lowrank@0.5, pifa@0.5 (auto form), pifa-slice@0.5.
Then end-to-end: a LLaMA-7B-shaped model (random weights) dense vs the MPIFA layout vs U V at density
0.5 (MPIFA: q/k/v/o/gate/up in their auto form, down_proj contiguous-slice via gate/up emitting its
pivot order), per dtype: prefill tokens/s, decode tokens/s (eager, or static cache + torch.compile =
CUDA graphs with --decode-mode compiled, the GPU default), peak memory.

Other modes (each runs alone):
  --memory       saved bytes (state_dict) of dense, U V and PIFA layers at r/d = 0.5 (meta device)
  --checkpoints  CPU, end-to-end on compressed checkpoints of SmolLM2-135M (a tiny LLaMA with --quick):
                 dense vs MPIFA 0.8 / 0.5 vs U V at the same densities vs 2:4 Wanda (dense kernels), each
                 compressed by leanformers.compress (small calibration, cached) and reloaded with
                 from_pretrained; generate at batch 1 and batch 8 (left-padded, checked against batch 1),
                 prefill of 512 / 2048 tokens; the dense run's profile gives the ideal speed-up; peak RSS
                 per model in a fresh process
  --profile      CPU, where a PIFA layer's time goes, op by op (gather, the two GEMMs, cat, bias, casts,
                 the rest = overhead), at 1 and 512 tokens, LLaMA-7B and SmolLM2 shapes; --compile adds
                 torch.compile per layer with its compile time
  --load-memory  peak RSS of from_pretrained on a compressed random 0.5B LLaMA per loading path, each in
                 a fresh process, against the safetensors size + the RSS after the imports

GPU:   python bench/pifa_speed.py                (fp16 + bf16, 8192 tokens, decode 1..16 with CUDA graphs)
CPU:   python bench/pifa_speed.py --quick        (fp32, small shapes, eager; smoke test, seconds)
CPU:   python bench/pifa_speed.py --checkpoints --dtypes float32,bfloat16 [--threads 2]
CPU:   python bench/pifa_speed.py --profile [--compile]
Any:   python bench/pifa_speed.py --memory --dtypes float16 --output bench/results/pifa_layer_bytes.json
Any:   python bench/pifa_speed.py --load-memory
Prints a table last and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import command_line, output_path, parser, print_table, sync, write_json
from harness import environment as harness_environment
from harness import llama_config as make_llama_config
from torch import nn

from leanformers.storage.layers import LowRankLinear, PIFALinear
from leanformers.storage.pifa_linear import auto_form, emit_in_order_
from leanformers.storage.rank import lowrank_rank, pifa_rank

FULL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]
QUICK_SHAPES = [(256, 256), (512, 256), (256, 512)]
DECODE_TOKENS = [1, 2, 4, 8, 16]


class ReferencePIFA(nn.Module):
    """The reference implementation's forward: two GEMMs, then two scatters into the output."""

    def __init__(self, layer: PIFALinear) -> None:
        super().__init__()
        f = layer.factors()  # row form
        self.weight, self.coeff, self.bias = layer.weight, layer.coeff, layer.bias
        self.register_buffer("pivots", f.pivots.long())
        self.register_buffer("nonpivots", f.nonpivots.long())
        self.out_features = layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, self.weight)
        out = x.new_empty(*x.shape[:-1], self.out_features)
        out.index_copy_(-1, self.pivots, z)
        out.index_copy_(-1, self.nonpivots, F.linear(z, self.coeff))
        return out if self.bias is None else out + self.bias


@torch.no_grad()
def random_pifa(m: int, n: int, r: int, form: str, dtype, device, seed: int = 0) -> PIFALinear:
    """A PIFA layer with random factors and a random pivot set (speed does not depend on the values)."""
    g = torch.Generator().manual_seed(seed)
    layer = PIFALinear(n, m, r, bias=False, form=form, dtype=dtype, device=device)
    d = m if form == "row" else n
    perm = torch.randperm(d, generator=g)
    perm = torch.cat([torch.sort(perm[:r]).values, torch.sort(perm[r:]).values])
    index = torch.argsort(perm) if form == "row" else perm
    layer._index.copy_(index.to(torch.int32))
    layer.weight.normal_(0, 0.02)
    layer.coeff.normal_(0, 0.02)
    return layer


@torch.no_grad()
def random_lowrank(m: int, n: int, r: int, dtype, device) -> LowRankLinear:
    layer = LowRankLinear(n, m, r, bias=False, dtype=dtype, device=device)
    layer.weight.normal_(0, 0.02)
    layer.weight_in.normal_(0, 0.02)
    return layer


@torch.no_grad()
def time_module(module: nn.Module, x: torch.Tensor, graphs: bool, reps: int, warmup: int = 3) -> float:
    """Median microseconds per call; with ``graphs`` the call is captured once in a CUDA graph."""
    device = x.device
    for _ in range(warmup):
        module(x)
    sync(device)
    if device.type == "cuda":
        fn = lambda: module(x)  # noqa: E731
        if graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                module(x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                module(x)
            fn = graph.replay
        inner = 20 if graphs else 5
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000.0 / inner)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        module(x)
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def layer_rows(m: int, n: int, dtype, device) -> dict[str, nn.Module]:
    """The modules compared for one shape (see the module docstring)."""
    r_half = min(m, n) // 2
    dense = nn.Linear(n, m, bias=False, dtype=dtype, device=device)
    rows: dict[str, nn.Module] = {"dense": dense}
    rows["lowrank r/d=.5"] = random_lowrank(m, n, r_half, dtype, device)
    row = random_pifa(m, n, r_half, "row", dtype, device)
    rows["pifa-ref r/d=.5"] = ReferencePIFA(row)
    rows["pifa-row r/d=.5"] = row
    rows["pifa-col r/d=.5"] = random_pifa(m, n, r_half, "column", dtype, device)
    sliced = random_pifa(m, n, r_half, "column", dtype, device)
    sliced.input_permuted = True
    rows["pifa-slice r/d=.5"] = sliced
    r_lr, r_pifa = lowrank_rank(m, n, 0.5), pifa_rank(m, n, 0.5)
    rows["lowrank@0.5"] = random_lowrank(m, n, r_lr, dtype, device)
    rows["pifa@0.5"] = random_pifa(m, n, r_pifa, auto_form(m, n), dtype, device)
    sliced = random_pifa(m, n, r_pifa, "column", dtype, device)
    sliced.input_permuted = True
    rows["pifa-slice@0.5"] = sliced
    return rows


@torch.no_grad()
def bench_layers(shapes, dtypes, prefill_tokens, decode_tokens, device, reps) -> list[dict]:
    results = []
    graphs = device.type == "cuda"
    for dtype in dtypes:
        for m, n in shapes:
            rows = layer_rows(m, n, dtype, device)
            for tokens in [prefill_tokens, *decode_tokens]:
                x = torch.randn(tokens, n, dtype=dtype, device=device)
                # decode sizes are launch-bound: capture them in CUDA graphs on the GPU
                use_graphs = graphs and tokens <= 16
                if device.type == "cpu":  # a shared CPU: interleave the rows within each repeat
                    timed_us = time_interleaved({n: (lambda m=m, x=x: m(x)) for n, m in rows.items()}, reps)
                for name, module in rows.items():
                    us = timed_us[name] if device.type == "cpu" else time_module(module, x, use_graphs, reps)
                    results.append(
                        {
                            "dtype": str(dtype).removeprefix("torch."),
                            "shape": f"{m}x{n}",
                            "tokens": tokens,
                            "row": name,
                            "us": us,
                            "cuda_graph": use_graphs,
                        }
                    )
            del rows
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def state_bytes(module: nn.Module) -> int:
    """Bytes of everything ``save_pretrained`` stores for ``module`` (its state_dict tensors)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def layer_bytes(shapes, dtype) -> list[dict]:
    """Saved bytes of dense / low-rank / PIFA layers at r = min(m, n) / 2 (meta device: counts only)."""
    rows = []
    for m, n in shapes:
        r = min(m, n) // 2
        kw = {"bias": False, "dtype": dtype, "device": "meta"}
        lowrank = state_bytes(LowRankLinear(n, m, r, **kw))
        pifa = {form: state_bytes(PIFALinear(n, m, r, form=form, **kw)) for form in ("row", "column")}
        rows.append(
            {
                "shape": f"{m}x{n}",
                "dtype": str(dtype).removeprefix("torch."),
                "rank": r,
                "dense_bytes": state_bytes(nn.Linear(n, m, **kw)),
                "lowrank_bytes": lowrank,
                "pifa_row_bytes": pifa["row"],
                "pifa_column_bytes": pifa["column"],
                "pifa_saving_vs_lowrank": 1 - min(pifa.values()) / lowrank,
            }
        )
    total_lr = sum(r["lowrank_bytes"] for r in rows)
    total_pifa = sum(min(r["pifa_row_bytes"], r["pifa_column_bytes"]) for r in rows)
    rows.append(
        {
            "shape": "all shapes",
            "lowrank_bytes": total_lr,
            "pifa_saving_vs_lowrank": 1 - total_pifa / total_lr,
        }
    )
    return rows


def summarise_layers(results: list[dict]) -> list[dict]:
    """Per (dtype, shape, tokens): the ratios the targets are stated in."""
    keyed: dict[tuple, dict[str, float]] = {}
    for r in results:
        keyed.setdefault((r["dtype"], r["shape"], r["tokens"]), {})[r["row"]] = r["us"]
    summary = []
    for (dtype, shape, tokens), t in keyed.items():
        best_half = min(t["pifa-row r/d=.5"], t["pifa-col r/d=.5"])
        best_dens = min(t["pifa@0.5"], t["pifa-slice@0.5"])
        summary.append(
            {
                "dtype": dtype,
                "shape": shape,
                "tokens": tokens,
                "dense_us": t["dense"],
                "lowrank_us": t["lowrank r/d=.5"],
                "ref_us": t["pifa-ref r/d=.5"],
                "row_us": t["pifa-row r/d=.5"],
                "col_us": t["pifa-col r/d=.5"],
                "slice_us": t["pifa-slice r/d=.5"],
                "pifa_vs_lowrank": t["lowrank r/d=.5"] / best_half,
                "slice_vs_lowrank": t["lowrank r/d=.5"] / t["pifa-slice r/d=.5"],
                "ref_vs_lowrank": t["lowrank r/d=.5"] / t["pifa-ref r/d=.5"],
                "pifa_vs_dense@0.5": t["dense"] / best_dens,
                "lowrank_vs_dense@0.5": t["dense"] / t["lowrank@0.5"],
            }
        )
    return summary


# -- end-to-end -------------------------------------------------------------------------------------
def llama_config(quick: bool):
    if quick:
        return make_llama_config(256, 688, 2, 4, vocab=512, max_positions=1024)
    return make_llama_config(4096, 11008, 32, 32, vocab=32000, max_positions=8192)  # LLaMA-7B shapes


@torch.no_grad()
def to_mpifa_layout(model: nn.Module, density: float, dtype, device) -> nn.Module:
    """Random PIFA layers at ``density`` in the scatter-free MLP layout (values do not affect speed)."""
    for i, block in enumerate(model.model.layers):
        for parent, names in (
            (block.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (block.mlp, ("gate_proj", "up_proj", "down_proj")),
        ):
            for j, name in enumerate(names):
                old = getattr(parent, name)
                m, n = old.out_features, old.in_features
                form = "column" if name == "down_proj" else auto_form(m, n)
                setattr(
                    parent,
                    name,
                    random_pifa(m, n, pifa_rank(m, n, density), form, dtype, device, seed=31 * i + j),
                )
        emit_in_order_([block.mlp.gate_proj, block.mlp.up_proj], block.mlp.down_proj)
    return model


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


@torch.no_grad()
def bench_model(model, prefill_tokens: int, decode_tokens: int, device, reps: int, compiled: bool) -> dict:
    """Prefill tokens/s (one forward, no cache) and decode tokens/s (generate, batch 1, greedy: the
    time of ``decode_tokens`` new tokens minus that of the first); ``compiled``: static cache, which
    generate compiles (CUDA graphs), else eager with the dynamic cache."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prefill_tokens), device=device)
    _peak_reset(device)
    times = []
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        sync(device)
        times.append(time.perf_counter() - t0)
    prefill_s = statistics.median(times[1:])
    out = {"prefill_tok_s": prefill_tokens / prefill_s, "peak_prefill_gib": _peak(device)}
    if decode_tokens == 0:  # prefill only
        out.update(
            {
                "decode_tok_s": None,
                "decode_mode": "not run",
                "peak_decode_gib": None,
                "params": sum(p.numel() for p in model.parameters()),
            }
        )
        return out

    prompt = ids[:, :32]
    kwargs = {"do_sample": False, "min_new_tokens": decode_tokens, "max_new_tokens": decode_tokens}
    if compiled:
        kwargs["cache_implementation"] = "static"  # generate compiles the decode step (CUDA graphs)
    mode = "static cache + compile" if compiled else "eager, dynamic cache"
    try:
        model.generate(prompt, **kwargs)  # warm-up / compilation
    except Exception as exc:  # keep the numbers honest: fall back to eager decoding and say so
        kwargs.pop("cache_implementation", None)
        mode = f"eager (compiled decode failed: {type(exc).__name__}: {str(exc)[:120]})"
        model.generate(prompt, **kwargs)
    _peak_reset(device)
    totals, firsts = [], []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        model.generate(prompt, **{**kwargs, "min_new_tokens": 1, "max_new_tokens": 1})
        sync(device)
        t1 = time.perf_counter()
        model.generate(prompt, **kwargs)
        sync(device)
        t2 = time.perf_counter()
        firsts.append(t1 - t0)
        totals.append(t2 - t1)
    decode_s = max(statistics.median(totals) - statistics.median(firsts), 1e-9)
    out.update(
        {
            "decode_tok_s": (decode_tokens - 1) / decode_s,
            "decode_mode": mode,
            "peak_decode_gib": _peak(device),
            "params": sum(p.numel() for p in model.parameters()),
        }
    )
    return out


E2E_VARIANTS = ("dense", "mpifa@0.5", "lowrank@0.5")


@torch.no_grad()
def to_lowrank_layout(model: nn.Module, density: float, dtype, device) -> nn.Module:
    """Random U V layers at ``density`` (the low-rank model of the same parameter count)."""
    for block in model.model.layers:
        for parent, names in (
            (block.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (block.mlp, ("gate_proj", "up_proj", "down_proj")),
        ):
            for name in names:
                old = getattr(parent, name)
                m, n = old.out_features, old.in_features
                setattr(parent, name, random_lowrank(m, n, lowrank_rank(m, n, density), dtype, device))
    return model


def e2e_model(name: str, config, dtype, device) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    if name == "mpifa@0.5":
        to_mpifa_layout(model, 0.5, dtype, device)
    elif name == "lowrank@0.5":
        to_lowrank_layout(model, 0.5, dtype, device)
    return model


def bench_end_to_end(quick: bool, dtypes, device, reps: int, decode_tokens: int, compiled: bool) -> dict:
    """The LLaMA-7B-shaped random model (tiny with --quick): dense vs the MPIFA layout vs U V at density
    0.5, per dtype: prefill tokens/s, decode tokens/s (``decode_tokens`` 0: prefill only), peak memory."""
    config = llama_config(quick)
    prefill = 512 if quick else 8192
    out = {
        "prefill_tokens": prefill,
        "decode_tokens": decode_tokens,
        "decode_mode": "not run"
        if not decode_tokens
        else ("static cache + compile" if compiled else "eager"),
        "runs": {},
        "speedups": [],
    }
    for dtype in dtypes:
        dname = str(dtype).removeprefix("torch.")
        runs = out["runs"][dname] = {}
        for name in E2E_VARIANTS:
            model = e2e_model(name, config, dtype, device)
            runs[name] = bench_model(model, prefill, decode_tokens, device, reps, compiled)
            del model
            _peak_reset(device)
        for name in E2E_VARIANTS[1:]:
            d, v = runs["dense"], runs[name]
            out["speedups"].append(
                {
                    "dtype": dname,
                    "variant": name,
                    "prefill": v["prefill_tok_s"] / d["prefill_tok_s"],
                    "decode": v["decode_tok_s"] / d["decode_tok_s"] if decode_tokens else None,
                }
            )
    return out


# -- where a layer's time goes (CPU profile) --------------------------------------------------------
PROFILE_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # LLaMA-7B, r/d = 0.5
SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down
QUICK_PROFILE_SHAPES = [(256, 256), (128, 256)]


def _ops(layer: PIFALinear, x2: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The forward of ``layer`` on (T, in) ``x2`` split into its operations, each a separate call on
    inputs prepared in advance (so each times one op and its own dispatch)."""
    r = layer.rank
    cd = torch.promote_types(x2.dtype, layer.coeff.dtype)
    wide = cd != x2.dtype  # C stored wider than x: the casts are part of the forward
    coeff = layer.coeff.to(cd)
    if layer.form == "column":
        xp = x2.index_select(1, layer.input_index)
        head, tail = xp[:, :r].to(cd), xp[:, r:].to(cd)
        z = torch.addmm(head, tail, coeff.t()).to(x2.dtype)
        ops = {
            "gather": lambda: x2.index_select(1, layer.input_index),
            "coeff GEMM": lambda: torch.addmm(head, tail, coeff.t()),
            "weight GEMM": lambda: F.linear(z, layer.weight, layer.bias),
        }
        if wide:
            ops["casts"] = lambda: (xp[:, :r].to(cd), xp[:, r:].to(cd), layer.coeff.to(cd), z.to(x2.dtype))
        return ops
    z = F.linear(x2, layer.weight)
    zc = F.linear(z.to(cd), coeff).to(z.dtype)
    y = torch.cat([z, zc], dim=-1)
    ops = {
        "weight GEMM": lambda: F.linear(x2, layer.weight),
        "coeff GEMM": lambda: F.linear(z.to(cd), coeff),
        "cat": lambda: torch.cat([z, zc], dim=-1),
        "gather": lambda: y.index_select(1, layer.output_index),
    }
    if layer.bias is not None:
        ops["bias"] = lambda: y.add(layer.bias)
    if wide:
        ops["casts"] = lambda: (z.to(cd), layer.coeff.to(cd), zc.to(z.dtype))
    return ops


def time_interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 3) -> dict[str, float]:
    """Median microseconds per call of each function, the functions interleaved within each repeat."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t0) * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def compile_row(modules: dict[str, nn.Module], x: torch.Tensor, reps: int) -> dict:
    """Opt-in torch.compile of each layer alone (inductor, default mode): the first call's time (the
    compile) and the steady state, next to eager."""
    out = {}
    for name, module in modules.items():
        torch._dynamo.reset()
        compiled = torch.compile(module, dynamic=False)
        t0 = time.perf_counter()
        try:
            compiled(x)
        except Exception as exc:  # no C++ toolchain, an unsupported op: recorded, not fatal
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            continue
        first = time.perf_counter() - t0
        us = time_interleaved({"eager": lambda m=module: m(x), "compiled": lambda c=compiled: c(x)}, reps)
        out[name] = {"compile_s": first, "eager_us": us["eager"], "compiled_us": us["compiled"]}
    torch._dynamo.reset()
    return out


COLD_BYTES = 96 * 2**20  # > 2x a 32 MB L3: cycling through this many bytes of copies reads from DRAM


def _copies(build: Callable[[int], nn.Module], cold: bool) -> list[nn.Module]:
    """Copies of a layer (different seeds) whose weights together exceed the caches when ``cold``: at
    batch 1 a model's layers stream from DRAM one after the other, and timing one small layer over
    and over would time it out of cache instead."""
    first = build(0)
    size = sum(t.numel() * t.element_size() for t in first.state_dict().values())
    return [first] + [build(i) for i in range(1, -(-COLD_BYTES // size) if cold else 1)]


def _cycle(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """One callable running the next of ``fns`` at each call."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()

    return call


def _profile_layers_of(m: int, n: int, r: int, dtype, cold: bool) -> dict[str, list[nn.Module]]:
    def sliced(seed):
        layer = random_pifa(m, n, r, "column", dtype, "cpu", seed=seed)
        layer.input_permuted = True
        return layer

    builds = {
        "dense": lambda seed: nn.Linear(n, m, bias=False, dtype=dtype),
        "lowrank": lambda seed: random_lowrank(m, n, r, dtype, "cpu"),
        "pifa-row": lambda seed: random_pifa(m, n, r, "row", dtype, "cpu", seed=seed),
        "pifa-col": lambda seed: random_pifa(m, n, r, "column", dtype, "cpu", seed=seed),
        "pifa-slice": sliced,
    }
    if dtype == torch.bfloat16:  # C stored in bf16 too: no fp32 product, no cast of C per call
        for form in ("row", "column"):
            short = "col" if form == "column" else "row"
            builds[f"pifa-{short} same-C"] = lambda seed, form=form: random_pifa(
                m, n, r, form, dtype, "cpu", seed=seed
            ).set_coefficient_dtype_("same")
    return {name: _copies(build, cold) for name, build in builds.items()}


@torch.no_grad()
def profile_layers(
    shapes, tokens_list, dtype, reps: int, with_compile: bool, density: float | None, cold: bool = True
) -> list[dict]:
    """Per shape and token count: dense, low-rank and the PIFA layouts at the same rank (r/d = 0.5, or
    the PIFA rank of ``density``), each PIFA forward split into its ops; overhead = the layer's time
    minus its ops' (module call, Python glue, allocations). At 1 token every row cycles through copies
    of its layer that do not fit in the caches (``_copies``), as the layers of a model at decode do."""
    from tests.storage.test_forward import previous_forward

    rows = []
    for m, n in shapes:
        r = pifa_rank(m, n, density) if density else min(m, n) // 2
        for tokens in tokens_list:
            layers = _profile_layers_of(m, n, r, dtype, cold=cold and tokens == 1)
            x = torch.randn(1, tokens, n, dtype=dtype)
            fns = {
                name: _cycle([lambda mod=mod, x=x: mod(x) for mod in mods]) for name, mods in layers.items()
            }
            for form in ("row", "col"):
                mods = layers[f"pifa-{form}"]
                fns[f"pifa-{form} previous"] = _cycle(
                    [lambda mod=mod, x=x: previous_forward(mod, x) for mod in mods]
                )
                per_copy = [_ops(mod, x.reshape(-1, n)) for mod in mods]
                for op in per_copy[0]:
                    fns[f"pifa-{form}: {op}"] = _cycle([ops[op] for ops in per_copy])
            big = m * n * tokens > 2**26
            us = time_interleaved(fns, max(3, reps // 4) if big else reps)
            row = {
                "dtype": str(dtype).removeprefix("torch."),
                "shape": f"{m}x{n}",
                "rank": r,
                "tokens": tokens,
                "copies": len(layers["dense"]),
            }
            row["us"] = us
            for form in ("row", "col"):
                ops = sum(v for k, v in us.items() if k.startswith(f"pifa-{form}: "))
                row[f"pifa-{form} overhead_us"] = us[f"pifa-{form}"] - ops
            best = min(us["pifa-row"], us["pifa-col"])
            row["pifa_vs_lowrank"] = us["lowrank"] / best
            row["pifa_vs_dense"] = us["dense"] / best
            if "pifa-row same-C" in us:
                same = min(us["pifa-row same-C"], us["pifa-col same-C"])
                row["pifa_same_c_vs_lowrank"] = us["lowrank"] / same
            row["new_vs_previous"] = {
                form: us[f"pifa-{form} previous"] / us[f"pifa-{form}"] for form in ("row", "col")
            }
            if with_compile:
                mods = {k: layers[k][0] for k in ("dense", "lowrank", "pifa-row", "pifa-col")}
                row["compile"] = compile_row(mods, x, max(3, reps // 4) if big else reps)
            rows.append(row)
            print(
                f"{row['shape']} r={r} T={tokens}: lowrank {us['lowrank']:.1f} row {us['pifa-row']:.1f} "
                f"col {us['pifa-col']:.1f} dense {us['dense']:.1f} us",
                file=sys.stderr,
                flush=True,
            )
            del layers
    return rows


def format_profile(env: dict, rows: list[dict]) -> str:
    lines = [
        f"PIFA layer profile - {env['device']}, torch {env['torch']}, {env['date']}: median us per call,"
        " interleaved; overhead = layer - its ops",
    ]
    for row in rows:
        us = row["us"]
        lines.append(
            f"\n{row['dtype']} {row['shape']} r={row['rank']} T={row['tokens']}: dense {us['dense']:.1f}, "
            f"lowrank {us['lowrank']:.1f}, pifa-row {us['pifa-row']:.1f} (previous {us['pifa-row previous']:.1f}), "
            f"pifa-col {us['pifa-col']:.1f} (previous {us['pifa-col previous']:.1f}), slice {us['pifa-slice']:.1f}; "
            f"pifa/lowrank {row['pifa_vs_lowrank']:.2f}x, pifa/dense {row['pifa_vs_dense']:.2f}x"
        )
        for form in ("row", "col"):
            ops = ", ".join(
                f"{k.split(': ')[1]} {v:.1f}" for k, v in us.items() if k.startswith(f"pifa-{form}: ")
            )
            lines.append(f"  pifa-{form}: {ops}, overhead {row[f'pifa-{form} overhead_us']:.1f}")
        for name, c in row.get("compile", {}).items():
            if "error" in c:
                lines.append(f"  compile {name}: {c['error']}")
            else:
                lines.append(
                    f"  compile {name}: {c['compile_s']:.1f} s, eager {c['eager_us']:.1f} -> {c['compiled_us']:.1f} us"
                )
    return "\n".join(lines)


# -- end-to-end on compressed checkpoints (SmolLM2-135M; a tiny LLaMA with --quick) -----------------
CHECKPOINT_VARIANTS = ("dense", "mpifa@0.8", "mpifa@0.5", "lowrank@0.8", "lowrank@0.5", "2:4")
PROMPT_LENGTHS = (24, 31, 17, 40, 12, 28, 35, 20)  # batch 8, left-padded to 40
QUICK_PROMPT_LENGTHS = (5, 8, 3, 10, 4, 7, 9, 6)


# "mpifa@0.8/same-C": the mpifa@0.8 checkpoint loaded with coefficient_dtype="same" (in a bf16 model C
# in bf16 instead of the default fp16, whose product runs in fp32 and converts C at every call)
SAME_COEFF = "/same-C"


def variant_config(name: str, nsamples: int, seqlen: int):
    """The compression config of a variant: MPIFA (PIFA layers), MPIFA with U V output at the same
    density (the low-rank model of equal parameter count), or 2:4 Wanda (dense kernels)."""
    from leanformers import MPIFAConfig, WandaConfig

    common = {"nsamples": nsamples, "seqlen": seqlen, "batch_size": 4, "device": "cpu"}
    name = name.removesuffix(SAME_COEFF)
    if name == "2:4":
        return WandaConfig(**common)
    method, _, density = name.partition("@")
    if method not in ("mpifa", "lowrank") or not density:
        raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(CHECKPOINT_VARIANTS)}")
    return MPIFAConfig(density=float(density), output="pifa" if method == "mpifa" else "lowrank", **common)


def _load_options(variant: str) -> dict:
    if not variant.endswith(SAME_COEFF):
        return {}
    from leanformers import MPIFAQuantizationConfig

    return {"quantization_config": MPIFAQuantizationConfig(coefficient_dtype="same")}


def compressed_checkpoint(source: Path, name: str, calibration, label: str, args, cache: Path) -> dict:
    """Folder of ``source`` compressed as ``name`` says, made once and reused from ``cache`` (the key,
    hashed into the folder name, covers everything the compressed tensors depend on)."""
    import hashlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leanformers import __version__, compress, save_compressed

    if name == "dense":
        return {"folder": str(source), "compress_s": 0.0}
    key = [str(source), name, args.calib_samples, args.calib_seqlen, label, __version__]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    folder = cache / f"{name.replace('@', '-').replace(':', '-')}-{digest}"
    if (folder / "config.json").is_file():
        return {"folder": str(folder), "compress_s": None, "cached": True}
    tokenizer = AutoTokenizer.from_pretrained(source) if (source / "tokenizer.json").is_file() else None
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    t0 = time.perf_counter()
    compress(model, tokenizer, variant_config(name, args.calib_samples, args.calib_seqlen), calibration)
    seconds = time.perf_counter() - t0
    save_compressed(model, tokenizer, folder)  # atomic: a stopped run leaves no half folder
    print(f"compressed {name} in {seconds:.0f} s -> {folder}", file=sys.stderr, flush=True)
    return {"folder": str(folder), "compress_s": seconds, "cached": False}


def targeted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The linears MPIFA targets by default: every nn.Linear / compressed layer inside the decoder blocks."""
    from leanformers.storage.layers import CompressedLinear

    return {
        name: m
        for name, m in model.model.layers.named_modules()
        if isinstance(m, (nn.Linear, CompressedLinear))
    }


def kept_share(model: nn.Module) -> float:
    """Stored weights of the targeted linears over their dense count (1.0 for dense kernels: 2:4 too)."""
    stored = dense = 0
    for m in targeted_modules(model).values():
        dense += m.in_features * m.out_features
        stored += getattr(m, "num_parameters", m.in_features * m.out_features)
    return stored / dense


class LinearClock:
    """Wall time spent inside the targeted linears (forward hooks) over a ``with`` block."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(targeted_modules(model).values())
        self.seconds = 0.0

    def __enter__(self) -> LinearClock:
        starts: dict[int, float] = {}

        def pre(module, args):
            starts[id(module)] = time.perf_counter()

        def post(module, args, output):
            self.seconds += time.perf_counter() - starts.pop(id(module))

        self.handles = [m.register_forward_pre_hook(pre) for m in self.modules]
        self.handles += [m.register_forward_hook(post) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def checkpoint_inputs(args, tokenizer, vocab: int) -> dict:
    """Prompts (8 lengths, for batch 1 and the left-padded batch 8) and the prefill windows."""
    lengths = QUICK_PROMPT_LENGTHS if args.quick else PROMPT_LENGTHS
    longest = max(args.prefill)
    if tokenizer is None:
        ids = torch.randint(0, vocab, (longest + sum(lengths),), generator=torch.Generator().manual_seed(0))
    else:
        from leanformers.data import load_text, shared_data_path, tokenize_text

        text = load_text(str(shared_data_path("wikitext-2-raw-test.txt")))
        ids = tokenize_text(text[: 40 * (longest + sum(lengths))], tokenizer).flatten()
    prompts, start = [], longest
    for n in lengths:
        prompts.append(ids[start : start + n].clone())
        start += n
    pad = 0
    if tokenizer is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(lengths)
    batch = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as generate expects for decoder-only models
        batch[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return {
        "prompts": prompts,
        "batch": batch,
        "mask": mask,
        "pad": pad,
        "prefill": {n: ids[:n].unsqueeze(0) for n in args.prefill},
    }


def _generate(model, ids, mask, pad: int, new_tokens: int) -> torch.Tensor:
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=pad,
    )
    return out[:, ids.shape[1] :]


def measure_call(model, measure: str, rep: int, inputs: dict, new_tokens: int) -> tuple[int, object]:
    """Run one call of ``measure``; returns (tokens it counts, output). decode: batch 1, prompt
    ``rep`` mod 8; batch8: the 8 prompts left-padded; prefillN: one forward of N tokens, no cache,
    last position's logits only (what generate's prefill computes)."""
    if measure == "decode":
        prompt = inputs["prompts"][rep % len(inputs["prompts"])].unsqueeze(0)
        return new_tokens, _generate(model, prompt, torch.ones_like(prompt), inputs["pad"], new_tokens)
    if measure == "batch8":
        out = _generate(model, inputs["batch"], inputs["mask"], inputs["pad"], new_tokens)
        return out.numel(), out
    n = int(measure.removeprefix("prefill"))
    model(input_ids=inputs["prefill"][n], use_cache=False, logits_to_keep=1)
    return n, None


def time_measure(models: dict, measure: str, reps: int, inputs: dict, new_tokens: int) -> dict:
    """Interleaved repeats (each repeat runs every model, in an order rotated per repeat), then one
    more call per model under the LinearClock (the profile: share of time in the targeted linears)."""
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, dict[int, torch.Tensor]] = {n: {} for n in names}
    counted = {}
    for name in names:  # warm-up (allocator, first-call paths)
        measure_call(models[name], measure, 0, {**inputs}, 2 if measure != "decode" else 2)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            t0 = time.perf_counter()
            counted[name], out = measure_call(models[name], measure, rep, inputs, new_tokens)
            times[name].append(time.perf_counter() - t0)
            if out is not None:
                outputs[name][rep % len(inputs["prompts"])] = out
    rows = {}
    for name in names:
        with LinearClock(models[name]) as clock:
            t0 = time.perf_counter()
            measure_call(models[name], measure, 0, inputs, new_tokens)
            total = time.perf_counter() - t0
        med = statistics.median(times[name])
        rows[name] = {
            "seconds": times[name],
            "tok_s": counted[name] / med,
            "profile": {"total_s": total, "linear_s": clock.seconds, "linear_share": clock.seconds / total},
        }
    dense = names[0]
    for name in names:
        paired = [d / v for d, v in zip(times[dense], times[name])]
        rows[name]["speedup_vs_dense"] = rows[name]["tok_s"] / rows[dense]["tok_s"]
        rows[name]["paired_speedup_median"] = statistics.median(paired)
    return {"rows": rows, "outputs": outputs}


def batch_check(decode_outputs: dict, batch_outputs: dict) -> dict:
    """Each row of the batch-8 (left-padded) output against the batch-1 output of the same prompt."""
    result = {}
    for name, by_prompt in decode_outputs.items():
        batch = batch_outputs.get(name, {}).get(0)
        if batch is None:
            continue
        rows = []
        for i in range(batch.shape[0]):
            single = by_prompt.get(i)
            if single is None:
                rows.append(None)
                continue
            diff = (single[0] != batch[i]).nonzero()
            rows.append(-1 if diff.numel() == 0 else int(diff[0, 0]))
        checked = [r for r in rows if r is not None]
        result[name] = {
            "rows_checked": len(checked),
            "rows_equal": sum(r == -1 for r in checked),
            "first_mismatch": rows,
            "equal": bool(checked) and all(r == -1 for r in checked),
        }
    return result


def rss_probe(folder: str, dtype, new_tokens: int, load_kwargs: dict | None = None) -> dict:
    """In this (fresh) process: RSS after the imports (torch, transformers, leanformers), then the peak
    RSS (VmHWM) over loading ``folder`` (``from_pretrained`` with ``load_kwargs``), reading every tensor
    once (the load maps the file; its pages count when read) and one batch-1 generate of
    ``new_tokens`` (0: none); printed as one JSON line by ``--rss-probe``."""
    import psutil
    from transformers import AutoModelForCausalLM

    import leanformers  # noqa: F401  (the quantizer)
    from leanformers.compression.checkpoint_io import PeakHostMemory

    base = psutil.Process().memory_info().rss
    with PeakHostMemory() as peak:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **(load_kwargs or {})).eval()
        load_s = time.perf_counter() - t0
        loaded = psutil.Process().memory_info().rss
        load_peak = peak.so_far()
        # safetensors loads zero-copy (memory-mapped): the pages count once read, so read them all
        with torch.no_grad():
            for t in model.state_dict().values():
                t.sum()
        touched = psutil.Process().memory_info().rss
        if new_tokens:
            with torch.no_grad():
                ids = torch.arange(1, 17).unsqueeze(0) % model.config.vocab_size
                model.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {
        "rss_after_imports": base,
        "rss_after_load": loaded,
        "peak_rss_load": load_peak,
        "rss_after_reading_every_tensor": touched,
        "peak_rss": peak.peak,
        "peak_exact": peak.exact,
        "state_bytes": state,
        "load_s": load_s,
        "load_kwargs": {k: str(v) for k, v in (load_kwargs or {}).items()},
    }


def run_rss_probe(folder: str, dtype_name: str, new_tokens: int, threads: int, load_kwargs=None) -> dict:
    """``rss_probe`` in a fresh Python process (this script with ``--rss-probe``)."""
    import subprocess

    cmd = [sys.executable, __file__, "--rss-probe", str(folder), "--dtypes", dtype_name]
    cmd += ["--new-tokens", str(new_tokens), "--threads", str(threads)]
    cmd += ["--load-kwargs", json.dumps(load_kwargs or {})]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"RSS probe of {folder} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- peak memory of loading a compressed model ------------------------------------------------------
LOAD_PATHS = {
    "default": {},
    "low_cpu_mem_usage": {"low_cpu_mem_usage": True},
    "device_map auto": {"device_map": "auto"},
}


@torch.no_grad()
def write_compressed_random_llama(folder: Path, quick: bool, density: float) -> dict:
    """A random LLaMA built from config (docs/benchmarks.md §11's 64 x 768, 0.5B, untied; a tiny one
    with --quick) with every block linear a random PIFA layer at ``density``, saved with
    save_compressed. The dense linears exist only on the meta device."""
    from transformers import LlamaForCausalLM

    from leanformers import save_compressed

    if quick:
        cfg = make_llama_config(128, 344, 2, 4, vocab=512, max_positions=256, tie_word_embeddings=False)
    else:
        cfg = make_llama_config(768, 2048, 64, 12, 12, 32000, max_positions=4096, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    dense_params = sum(p.numel() for p in model.parameters())
    targets = [(n, m) for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]
    for i, (name, old) in enumerate(targets):
        m, n = old.out_features, old.in_features
        new = random_pifa(m, n, pifa_rank(m, n, density), auto_form(m, n), torch.float32, "cpu", seed=i)
        model.model.layers.set_submodule(name, new)
    g = torch.Generator().manual_seed(0)
    for module in (model.model.embed_tokens, model.lm_head):
        module.weight = nn.Parameter(torch.randn(module.weight.shape, generator=g) * 0.02)
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            module.weight = nn.Parameter(torch.ones(module.weight.shape))
    rotary = model.model.rotary_emb  # a non-persistent buffer: rebuilt on load, needed here only for .to()
    rotary.register_buffer("inv_freq", torch.zeros(rotary.inv_freq.shape), persistent=False)
    rotary.original_inv_freq = rotary.inv_freq
    save_compressed(model, None, folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    stored = sum(p.numel() for p in model.parameters())
    return {
        "config": cfg.to_dict(),
        "dense_params": dense_params,
        "stored_params": stored,
        "safetensors_bytes": size,
    }


def load_memory_main(args) -> dict:
    """``--load-memory``: peak RSS of ``from_pretrained`` on a compressed random LLaMA, per loading path,
    each in a fresh process, against the safetensors size + the fixed overhead (RSS after imports)."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="pifa-load-memory-", dir=args.cache_dir))
    try:
        built = write_compressed_random_llama(tmp / "model", args.quick, 0.5)
        rows = []
        for path in args.load_paths.split(","):
            if path not in LOAD_PATHS:
                raise SystemExit(f"--load-paths: unknown {path!r}; choose from {', '.join(LOAD_PATHS)}")
            kwargs = LOAD_PATHS[path]
            probe = run_rss_probe(tmp / "model", "float32", 0, args.threads, kwargs)
            fixed = probe["rss_after_imports"]
            bound = fixed + built["safetensors_bytes"]
            rows.append(
                {
                    "path": path,
                    "safetensors_GB": built["safetensors_bytes"] / 1e9,
                    "rss_after_imports_GB": fixed / 1e9,
                    "peak_rss_GB": probe["peak_rss"] / 1e9,
                    "peak_over_size_plus_fixed": probe["peak_rss"] / bound,
                    "load_s": probe["load_s"],
                    "met_1.1x": probe["peak_rss"] <= 1.1 * bound,
                    "probe": probe,
                }
            )
            print(f"{path}: peak {probe['peak_rss'] / 1e9:.2f} GB", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    env = environment(torch.device("cpu"), [torch.float32])
    env["quick"] = args.quick
    payload = {
        "environment": env,
        "model": built,
        "rows": rows,
        "command": command_line("pifa_speed", args.argv),
    }
    out = write_json(output_path(args, "pifa_load_memory"), payload)
    print(
        f"loading a compressed random LLaMA ({built['stored_params'] / 1e6:.0f}M stored of "
        f"{built['dense_params'] / 1e6:.0f}M dense parameters, float32)"
    )
    print_table(
        [
            {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items() if k != "probe"}
            for r in rows
        ],
        [
            "path",
            "safetensors_GB",
            "rss_after_imports_GB",
            "peak_rss_GB",
            "peak_over_size_plus_fixed",
            "load_s",
            "met_1.1x",
        ],
    )
    print(f"JSON: {out}", file=sys.stderr)
    return payload


def ideal_speedup(linear_share: float, kept: float) -> float:
    """1 / ((1 - f) + f k): the speed-up if only the targeted linears (share f of the dense run's time)
    got faster, in proportion to the share k of their weights kept."""
    return 1.0 / ((1.0 - linear_share) + linear_share * kept)


def _checkpoint_source(args, tmp: Path):
    """(source folder, tokenizer, calibration, calibration label, cache folder)."""
    from transformers import AutoTokenizer

    if args.quick:
        from harness import tiny_llama

        source = tmp / "tiny-llama"
        tiny_llama(seed=0, layers=2, hidden=64, intermediate=96).save_pretrained(source)
        vocab = 128
        g = torch.Generator().manual_seed(0)
        calibration = torch.randint(0, vocab, (args.calib_samples, args.calib_seqlen), generator=g)
        return source, None, calibration, "random ids", tmp / "cache"
    from leanformers.data import shared_data_path
    from leanformers.hub import cache_dir, smollm2_135m

    source = smollm2_135m()
    cache = Path(args.cache_dir) if args.cache_dir else cache_dir() / "pifa_speed"
    calib = shared_data_path("wikitext-2-v1-valid.txt")
    return source, AutoTokenizer.from_pretrained(source), str(calib), calib.name, cache


def checkpoint_targets(runs: list[dict], variants: dict) -> list[dict]:
    """Issue 21's CPU target per (dtype, threads, measure, variant): speed-up >= 0.9 x ideal, the
    speed-up being the median over repeats of dense time / variant time within the repeat."""
    dense = {(r["dtype"], r["threads"], r["measure"]): r for r in runs if r["variant"] == "dense"}
    out = []
    for r in runs:
        if r["variant"] == "dense":
            continue
        f = dense[(r["dtype"], r["threads"], r["measure"])]["profile"]["linear_share"]
        k = variants[r["variant"]]["kept_share"]
        ideal = ideal_speedup(f, k)
        out.append(
            {
                "dtype": r["dtype"],
                "threads": r["threads"],
                "measure": r["measure"],
                "variant": r["variant"],
                "linear_share_dense": f,
                "kept_share": k,
                "ideal": ideal,
                # the median of the per-repeat ratios: each repeat runs every model back to back, so
                # the load of a shared machine cancels better than in the ratio of the medians
                "speedup": r["paired_speedup_median"],
                "speedup_of_medians": r["speedup_vs_dense"],
                "of_ideal": r["paired_speedup_median"] / ideal,
                "met": r["paired_speedup_median"] >= 0.9 * ideal,
            }
        )
    return out


def bench_checkpoints(args, dtypes) -> dict:
    """Every variant compressed (cached), loaded with from_pretrained, timed interleaved per dtype."""
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM

    tmp = Path(tempfile.mkdtemp(prefix="pifa-speed-ckpt-"))
    try:
        source, tokenizer, calibration, label, cache = _checkpoint_source(args, tmp)
        variants = {
            name: compressed_checkpoint(
                source, name.removesuffix(SAME_COEFF), calibration, label, args, cache
            )
            for name in args.variants
        }
        runs, checks, load = [], {}, {}
        for dtype in dtypes:
            dname = str(dtype).removeprefix("torch.")
            models = {
                n: AutoModelForCausalLM.from_pretrained(v["folder"], dtype=dtype, **_load_options(n)).eval()
                for n, v in variants.items()
            }
            for name, model in models.items():
                variants[name]["kept_share"] = kept_share(model)
                variants[name]["params"] = sum(p.numel() for p in model.parameters())
            inputs = checkpoint_inputs(args, tokenizer, models["dense"].config.vocab_size)
            load_before, cpu0, wall0 = os.getloadavg(), time.process_time(), time.perf_counter()
            outputs = {}
            with torch.no_grad():
                for measure in args.measures:
                    # with batch8, batch 1 runs every prompt once: the references of the batch check
                    check = measure == "decode" and "batch8" in args.measures
                    reps = max(args.reps, len(inputs["prompts"])) if check else args.reps
                    res = time_measure(models, measure, reps, inputs, args.new_tokens)
                    outputs[measure] = res["outputs"]
                    for name, row in res["rows"].items():
                        runs.append(
                            {
                                "dtype": dname,
                                "threads": torch.get_num_threads(),
                                "measure": measure,
                                "variant": name,
                            }
                            | row
                        )
                    if args.save_partial is not None:  # a stopped run keeps its finished measures
                        args.save_partial({"variants": variants, "runs": runs, "load": load})
                    print(
                        f"{dname} {measure}: "
                        + ", ".join(f"{n} {r['tok_s']:.1f} tok/s" for n, r in res["rows"].items()),
                        file=sys.stderr,
                        flush=True,
                    )
            wall = time.perf_counter() - wall0
            load[dname] = {
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "cpu_share_of_wall": (time.process_time() - cpu0) / wall / torch.get_num_threads(),
                "wall_s": wall,
            }
            if "decode" in outputs and "batch8" in outputs:
                checks[dname] = batch_check(outputs["decode"], outputs["batch8"])
            del models
        rss = {}
        for dtype in dtypes if not args.no_rss else []:
            dname = str(dtype).removeprefix("torch.")
            for name in args.rss_variants or args.variants:
                rss[f"{name} {dname}"] = run_rss_probe(
                    variants[name]["folder"], dname, 16, torch.get_num_threads()
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "source": "tiny LLaMA (random, from config)"
        if args.quick
        else "SmolLM2-135M-Instruct (dequantised Q4_1 GGUF)",
        "calibration": f"{label}: {args.calib_samples} x {args.calib_seqlen} tokens",
        "new_tokens": args.new_tokens,
        "prompt_lengths": [len(p) for p in inputs["prompts"]],
        "variants": variants,
        "runs": runs,
        "batch8_equals_batch1": checks,
        "load": load,
        "rss": rss,
        "targets": checkpoint_targets(runs, variants),
    }


def format_checkpoints(env: dict, res: dict) -> str:
    lines = [
        f"End-to-end, compressed checkpoints of {res['source']} - {env['device']}, torch {env['torch']}, "
        f"{env['date']}; calibration {res['calibration']}",
        f"tokens/s (median of interleaved repeats), speed-up vs dense (median of the per-repeat ratios) / ideal;"
        f" decode/batch8: {res['new_tokens']} new tokens (generate, greedy), prefillN: one forward of N tokens",
    ]
    keyed = {}
    for r in res["runs"]:
        keyed.setdefault((r["dtype"], r["threads"]), {}).setdefault(r["variant"], {})[r["measure"]] = r
    ideal = {(t["dtype"], t["threads"], t["measure"], t["variant"]): t for t in res["targets"]}
    for (dtype, threads), by_variant in keyed.items():
        measures = list(next(iter(by_variant.values())))
        lines.append(f"\n{dtype}, {threads} thread(s); load {res['load'].get(dtype, {})}")
        lines.append(f"{'variant':12} {'kept':>5} " + " ".join(f"{m:>22}" for m in measures))
        for variant, by_measure in by_variant.items():
            cells = []
            for m in measures:
                r = by_measure[m]
                t = ideal.get((dtype, threads, m, variant))
                extra = f" /{t['ideal']:.2f}" if t else "      "
                cells.append(f"{r['tok_s']:9.1f} {r['paired_speedup_median']:5.2f}x{extra}")
            kept = res["variants"][variant]["kept_share"]
            lines.append(f"{variant:12} {kept:5.3f} " + " ".join(f"{c:>22}" for c in cells))
    for dtype, check in res["batch8_equals_batch1"].items():
        lines.append(
            f"batch 8 (left-padded) == batch 1, {dtype}: "
            + ", ".join(f"{n} {c['rows_equal']}/{c['rows_checked']}" for n, c in check.items())
        )
    for key, probe in res["rss"].items():
        lines.append(
            f"peak RSS {key}: {probe['peak_rss'] / 2**20:.0f} MiB (after imports {probe['rss_after_imports'] / 2**20:.0f}"
            f" MiB, state {probe['state_bytes'] / 2**20:.0f} MiB)"
        )
    return "\n".join(lines)


def environment(device, dtypes) -> dict:
    env = harness_environment(device)
    env["dtypes"] = [str(d).removeprefix("torch.") for d in dtypes]
    env["threads"] = torch.get_num_threads()
    return env


def format_table(env, summary, e2e) -> str:
    lines = [
        f"PIFA speed - {env['device']}, torch {env['torch']}, transformers {env['transformers']}, {env['date']}",
        "times in microseconds (median); speed-ups > 1 mean faster; r/d=.5: r = min(m,n)/2; @0.5: density 0.5",
        f"{'dtype':8} {'shape':11} {'tok':>5} {'dense':>9} {'lowrank':>9} {'ref':>9} {'row':>9} {'col':>9} {'slice':>9}"
        f" {'pifa/lr':>8} {'slice/lr':>8} {'ref/lr':>7} {'pifa/dn@.5':>10} {'lr/dn@.5':>8}",
    ]
    for s in summary:
        lines.append(
            f"{s['dtype']:8} {s['shape']:11} {s['tokens']:>5} {s['dense_us']:9.1f} {s['lowrank_us']:9.1f} "
            f"{s['ref_us']:9.1f} {s['row_us']:9.1f} {s['col_us']:9.1f} {s['slice_us']:9.1f} "
            f"{s['pifa_vs_lowrank']:8.2f} {s['slice_vs_lowrank']:8.2f} {s['ref_vs_lowrank']:7.2f} "
            f"{s['pifa_vs_dense@0.5']:10.2f} {s['lowrank_vs_dense@0.5']:8.2f}"
        )
    if e2e:
        lines.append("")
        lines.append(
            f"end-to-end LLaMA-{'tiny' if env.get('quick') else '7B'}-shaped, prefill {e2e['prefill_tokens']} tokens,"
            f" decode {e2e['decode_tokens']} tokens ({e2e['decode_mode']})"
        )
        lines.append(
            f"{'dtype':9} {'model':12} {'params':>12} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak GiB':>9}"
        )
        for dname, runs in e2e["runs"].items():
            for name, r in runs.items():
                peaks = [p for p in (r["peak_prefill_gib"], r["peak_decode_gib"]) if p is not None]
                peak = f"{max(peaks):.2f}" if peaks else "-"
                decode = "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}"
                lines.append(
                    f"{dname:9} {name:12} {r['params']:>12,} {r['prefill_tok_s']:14.1f} {decode:>13} {peak:>9}"
                )
        for sp in e2e["speedups"]:
            decode = "not run" if sp["decode"] is None else f"{sp['decode']:.2f}x"
            lines.append(
                f"speed-up {sp['variant']}/dense ({sp['dtype']}): prefill {sp['prefill']:.2f}x, decode {decode}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__.split("\n")[0], "small CPU variant (fp32, small shapes, seconds)")
    ap.add_argument(
        "--device", default=None, help="cuda or cpu (default: cuda when available, cpu with --quick)"
    )
    ap.add_argument(
        "--dtypes", default=None, help="comma list, default float16,bfloat16 (float32 with --quick)"
    )
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end model benchmark")
    ap.add_argument("--memory", action="store_true", help="only count saved bytes per layer at r/d = 0.5")
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer benchmark")
    ap.add_argument(
        "--no-decode",
        action="store_true",
        help="end-to-end prefill only (the compiled decode costs minutes of compilation on a GPU)",
    )
    ap.add_argument(
        "--decode-mode",
        choices=("eager", "compiled"),
        default=None,
        help="end-to-end decode: eager (dynamic cache) or compiled (static cache, CUDA graphs); default "
        "compiled on CUDA, eager on the CPU",
    )
    ap.add_argument("--shapes", default=None, help="comma list of OUTxIN, e.g. 4096x4096,11008x4096")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs only; default 1)")
    ap.add_argument(
        "--checkpoints",
        action="store_true",
        help="end-to-end on compressed checkpoints of SmolLM2-135M (tiny LLaMA with --quick): dense vs "
        "MPIFA vs U V vs 2:4 through from_pretrained and generate; nothing else runs",
    )
    ap.add_argument("--variants", default=",".join(CHECKPOINT_VARIANTS), help="--checkpoints: comma list")
    ap.add_argument(
        "--measures", default=None, help="--checkpoints: comma list of decode,batch8,prefillN (default all)"
    )
    ap.add_argument("--prefill", default=None, help="--checkpoints: prefill lengths (default 512,2048)")
    ap.add_argument(
        "--new-tokens",
        type=int,
        default=None,
        help="tokens per generate: --checkpoints and the end-to-end decode (128; 8 / 16 with --quick)",
    )
    ap.add_argument("--calib-samples", type=int, default=None, help="--checkpoints: calibration windows (8)")
    ap.add_argument("--calib-seqlen", type=int, default=None, help="--checkpoints: window length (256)")
    ap.add_argument(
        "--cache-dir", default=None, help="--checkpoints: compressed folders (default in the cache)"
    )
    ap.add_argument("--no-rss", action="store_true", help="--checkpoints: skip the peak-RSS processes")
    ap.add_argument("--rss-variants", default=None, help="--checkpoints: variants probed for peak RSS (all)")
    ap.add_argument("--rss-probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--load-kwargs", default="{}", help=argparse.SUPPRESS)
    ap.add_argument(
        "--load-paths", default=",".join(LOAD_PATHS), help=f"--load-memory: comma list of {list(LOAD_PATHS)}"
    )
    ap.add_argument(
        "--load-memory",
        action="store_true",
        help="peak RSS of loading a compressed random 0.5B LLaMA (tiny with --quick) per loading path, "
        "each in a fresh process; nothing else runs (--cache-dir: where the checkpoint is written)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="CPU: where a PIFA layer's time goes, op by op, at 1 and 512 tokens, LLaMA-7B (r/d = 0.5) and "
        "SmolLM2 (density 0.8) shapes; nothing else runs",
    )
    ap.add_argument("--compile", action="store_true", help="--profile: also time torch.compile per layer")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.rss_probe:  # the child process of run_rss_probe
        torch.set_num_threads(args.threads)
        probe = rss_probe(
            args.rss_probe, getattr(torch, args.dtypes), args.new_tokens, json.loads(args.load_kwargs)
        )
        print(json.dumps(probe))
        return {}
    if args.checkpoints:
        return checkpoints_main(args)
    if args.profile:
        return profile_main(args)
    if args.load_memory:
        return load_memory_main(args)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available; use --quick on a CPU")
    dtype_names = args.dtypes or ("float32" if args.quick else "float16,bfloat16")
    dtypes = [getattr(torch, name.strip()) for name in dtype_names.split(",")]
    reps = args.reps or (5 if args.quick else 20)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in item.lower().split("x")) for item in args.shapes.split(",")]
        except ValueError:
            raise SystemExit(f"--shapes must look like 4096x4096,11008x4096, got {args.shapes!r}") from None
    if args.memory:
        rows = layer_bytes(shapes, dtypes[0])
        result = {"environment": environment(device, dtypes[:1]), "memory": rows}
        out = write_json(output_path(args, "pifa_layer_bytes"), result)
        print_table(
            [{**r, "pifa_saving_vs_lowrank": f"{100 * r['pifa_saving_vs_lowrank']:.2f} %"} for r in rows],
            [
                "shape",
                "rank",
                "dense_bytes",
                "lowrank_bytes",
                "pifa_row_bytes",
                "pifa_column_bytes",
                "pifa_saving_vs_lowrank",
            ],
        )
        print(f"JSON: {out}", file=sys.stderr)
        return result
    prefill = 256 if args.quick else 8192
    decode = [1, 16] if args.quick else DECODE_TOKENS
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # The CPU machines are shared: several threads spin against other jobs and make the timings
        # bimodal; one thread gives stable ratios (absolute CPU times are not the point here).
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        env = environment(device, dtypes)
        env["quick"] = args.quick
        raw = [] if args.no_layers else bench_layers(shapes, dtypes, prefill, decode, device, reps)
        summary = summarise_layers(raw)
        compiled = (args.decode_mode or ("compiled" if device.type == "cuda" else "eager")) == "compiled"
        decode_tokens = 0 if args.no_decode else (args.new_tokens or (16 if args.quick else 128))
        e2e = (
            None
            if args.no_e2e
            else bench_end_to_end(args.quick, dtypes, device, 3 if args.quick else 5, decode_tokens, compiled)
        )
    finally:
        torch.set_num_threads(threads)
    result = {"environment": env, "layers": raw, "summary": summary, "end_to_end": e2e}
    out = write_json(output_path(args, "pifa_speed"), result, indent=1)
    print(format_table(env, summary, e2e))
    print(f"JSON: {out}", file=sys.stderr)
    return result


def checkpoints_main(args) -> dict:
    """``--checkpoints``: the end-to-end run on compressed checkpoints (CPU)."""
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.variants[0] != "dense":
        raise SystemExit("--variants must start with dense (every speed-up is relative to it)")
    for name in args.variants[1:]:
        variant_config(name, 1, 2)  # an unknown name is an error before anything runs
    args.prefill = [int(v) for v in (args.prefill or ("32,96" if args.quick else "512,2048")).split(",")]
    measures = ["decode", "batch8", *(f"prefill{n}" for n in args.prefill)]
    args.measures = [m.strip() for m in args.measures.split(",")] if args.measures else measures
    unknown = set(args.measures) - set(measures)
    if unknown:
        raise SystemExit(f"--measures: unknown {sorted(unknown)}; choose from {measures}")
    args.new_tokens = args.new_tokens or (8 if args.quick else 128)
    args.calib_samples = args.calib_samples or (4 if args.quick else 8)
    args.calib_seqlen = args.calib_seqlen or (32 if args.quick else 256)
    args.reps = args.reps or (2 if args.quick else 5)
    if args.rss_variants:
        args.rss_variants = [v.strip() for v in args.rss_variants.split(",")]
    dtypes = [getattr(torch, n.strip()) for n in (args.dtypes or "float32").split(",")]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        env = environment(torch.device("cpu"), dtypes)
        env["quick"] = args.quick
        env["cpu_flags"] = cpu_flags()
        partial = output_path(args, "pifa_speed_checkpoints")
        partial = partial.with_name(partial.stem + ".partial.json")
        args.save_partial = lambda part: write_json(partial, {"environment": env, "partial": part}, indent=1)
        result = bench_checkpoints(args, dtypes)
        partial.unlink(missing_ok=True)
    finally:
        torch.set_num_threads(threads)
    payload = {"environment": env, "checkpoints": result, "command": command_line("pifa_speed", args.argv)}
    out = write_json(output_path(args, "pifa_speed_checkpoints"), payload, indent=1)
    print(format_checkpoints(env, result))
    print(f"JSON: {out}", file=sys.stderr)
    return payload


def profile_main(args) -> dict:
    """``--profile``: the op-by-op profile of the layer forwards (CPU)."""
    dtypes = [getattr(torch, n.strip()) for n in (args.dtypes or "float32").split(",")]
    reps = args.reps or (5 if args.quick else 40)
    tokens = [1, 16] if args.quick else [1, 512]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        env = environment(torch.device("cpu"), dtypes)
        env["quick"] = args.quick
        env["cpu_flags"] = cpu_flags()
        env["loadavg_before"] = os.getloadavg()
        rows = []
        for dtype in dtypes:
            if args.quick:
                rows += profile_layers(
                    QUICK_PROFILE_SHAPES, tokens, dtype, reps, args.compile, None, cold=False
                )
                continue
            if args.shapes:  # the given shapes at r/d = 0.5
                shapes = [tuple(int(v) for v in item.lower().split("x")) for item in args.shapes.split(",")]
                rows += profile_layers(shapes, tokens, dtype, reps, args.compile, None)
                continue
            rows += profile_layers(PROFILE_SHAPES, tokens, dtype, reps, args.compile, None)
            rows += profile_layers(SMOLLM2_SHAPES, tokens, dtype, reps, args.compile, 0.8)
        env["loadavg_after"] = os.getloadavg()
    finally:
        torch.set_num_threads(threads)
    payload = {"environment": env, "profile": rows, "command": command_line("pifa_speed", args.argv)}
    out = write_json(output_path(args, "pifa_speed_profile"), payload, indent=1)
    print(format_profile(env, rows))
    print(f"JSON: {out}", file=sys.stderr)
    return payload


def cpu_flags() -> dict:
    """The CPU model and the flags that decide bf16 speed (lscpu / /proc/cpuinfo)."""
    info = {"model": None, "bf16_flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name") and info["model"] is None:
            info["model"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            info["bf16_flags"] = sorted(
                f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f")
            )
            break
    return info


if __name__ == "__main__":
    main()
