"""PIFA layer and model speed (BENCHMARKS.md section 2).

Rows per shape (m x n = out x in), dtype and token count, all timed side by side in one run:
  dense            nn.Linear
  lowrank r/d=.5   U V at the rank PIFA gets at r/d = 0.5 (r = min(m, n) / 2)
  pifa-ref         the reference layer: two GEMMs + two index_copy_ output scatters
  pifa-row         PIFALinear row form (one output gather)
  pifa-col         PIFALinear column form (one input gather, fused addmm)
  pifa-slice       column form reading pivot-first input (no index op: upstream emits the order)
  and at density 0.5 (equal parameter count): lowrank@0.5, pifa@0.5 (auto form), pifa-slice@0.5.
Then end-to-end: a LLaMA-7B-shaped model (random weights) dense vs the MPIFA layout at density 0.5
(q/k/v/o/gate/up column form, down_proj contiguous-slice via gate/up emitting its pivot order):
prefill tokens/s, decode tokens/s (static cache + torch.compile "reduce-overhead" = CUDA graphs),
peak memory.

Memory (any machine, layers built on the meta device): ``--memory`` counts the bytes of the saved
state (state_dict: values, pivot index, bias) of dense, low-rank U V and PIFA (both forms) at r/d = 0.5
per shape, in the first dtype, and nothing else runs.

GPU:   python bench/pifa_speed.py                (fp16 + bf16, 8192 tokens, decode 1..16 with CUDA graphs)
CPU:   python bench/pifa_speed.py --quick        (fp32, small shapes, eager; smoke test, seconds)
Any:   python bench/pifa_speed.py --memory --dtypes float16 --output bench/results/pifa_layer_bytes.json
Prints a table last and writes JSON to bench/results/.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from harness import environment as harness_environment
from harness import llama_config as make_llama_config
from harness import output_path, parser, print_table, sync, write_json
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
                for name, module in rows.items():
                    us = time_module(module, x, use_graphs, reps)
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
def bench_model(model, prefill_tokens: int, decode_tokens: int, device, reps: int) -> dict:
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
    if device.type == "cuda":
        kwargs["cache_implementation"] = "static"  # generate compiles the decode step (CUDA graphs)
    mode = "static cache + compile" if device.type == "cuda" else "eager, dynamic cache"
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


def bench_end_to_end(quick: bool, dtype, device, reps: int, decode: bool = True) -> dict:
    from transformers import LlamaForCausalLM

    config = llama_config(quick)
    prefill = 512 if quick else 8192
    decode_tokens = 16 if quick else 128
    results = {"prefill_tokens": prefill, "decode_tokens": decode_tokens if decode else 0}
    for name in ("dense", "mpifa@0.5"):
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
        if name != "dense":
            to_mpifa_layout(model, 0.5, dtype, device)
        results[name] = bench_model(model, prefill, decode_tokens if decode else 0, device, reps)
        del model
        _peak_reset(device)
    d, p = results["dense"], results["mpifa@0.5"]
    results["prefill_speedup"] = p["prefill_tok_s"] / d["prefill_tok_s"]
    results["decode_speedup"] = p["decode_tok_s"] / d["decode_tok_s"] if decode else None
    return results


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
            f" decode {e2e['decode_tokens']} tokens ({e2e['dense']['decode_mode']} / {e2e['mpifa@0.5']['decode_mode']})"
        )
        lines.append(
            f"{'model':10} {'params':>12} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak GiB':>9}"
        )
        for name in ("dense", "mpifa@0.5"):
            r = e2e[name]
            peaks = [p for p in (r["peak_prefill_gib"], r["peak_decode_gib"]) if p is not None]
            peak = f"{max(peaks):.2f}" if peaks else "-"
            decode = "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}"
            lines.append(f"{name:10} {r['params']:>12,} {r['prefill_tok_s']:14.1f} {decode:>13} {peak:>9}")
        decode = "not run" if e2e["decode_speedup"] is None else f"{e2e['decode_speedup']:.2f}x"
        lines.append(f"speed-up mpifa/dense: prefill {e2e['prefill_speedup']:.2f}x, decode {decode}")
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
    ap.add_argument("--shapes", default=None, help="comma list of OUTxIN, e.g. 4096x4096,11008x4096")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs only; default 1)")
    args = ap.parse_args(argv)

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
        e2e = (
            None
            if args.no_e2e
            else bench_end_to_end(args.quick, dtypes[0], device, 3 if args.quick else 5, not args.no_decode)
        )
    finally:
        torch.set_num_threads(threads)
    result = {"environment": env, "layers": raw, "summary": summary, "end_to_end": e2e}
    out = write_json(output_path(args, "pifa_speed"), result, indent=1)
    print(format_table(env, summary, e2e))
    print(f"JSON: {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
