"""Micro-benchmarks: one operation timed or counted, rows in bench/rows/micro.yaml.

  python bench/micro.py --rows chts_predictor_cost --set repeats=1     # docs/benchmarks.md §16
  python bench/micro.py --rows chtss_update_cost                        # §5a one topology update
  python bench/micro.py --rows chtss_mask_memory --label after          # §7 (rows of other labels kept)
  python bench/micro.py --rows scaling_memory                           # issue 12 (meta device)
  python bench/micro.py --rows sst_generate --set repeats=9             # §6
  python bench/micro.py --quick                                         # every row, seconds (CI)

Benchmarks: a row's ``bench``, described in the rows file's header.
Each row writes bench/results/<row>[_quick].json (``--output``: with one row only) and prints its table last.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from pathlib import Path

import harness
import torch
from harness import environment, interleaved, llama_config, load_rows, print_table, row_settings, timed
from torch import nn

import leanformers
from leanformers.chts import CHTssConfig, CHTssController
from leanformers.chts.predictors import l3n_scores, l3p_scores
from leanformers.chts.rewiring import Rewiring

# hidden, intermediate, blocks, heads, kv heads: LLaMA sparse subsets
SHAPES = {"quick": (256, 688, 2, 4, 4), "quick4": (256, 688, 4, 4, 4), "llama130m": (768, 2048, 12, 12, 12)}
SHAPES["llama7b"] = (4096, 11008, 32, 32, 32)


class SparseSubset(nn.Module):
    """The q/k/v/o/gate/up/down linears of a LLaMA (named as in transformers), random init."""

    def __init__(self, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, dtype, device):
        super().__init__()
        kv = kv_heads * (hidden // heads)
        attention = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden)}
        attention["o_proj"] = (hidden, hidden)
        mlp = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}

        def part(shapes: dict) -> nn.ModuleDict:
            kw = {"bias": False, "dtype": dtype, "device": device}
            return nn.ModuleDict({k: nn.Linear(i, o, **kw) for k, (o, i) in shapes.items()})

        blocks = ({"self_attn": part(attention), "mlp": part(mlp)} for _ in range(layers))
        self.layers = nn.ModuleList(nn.ModuleDict(block) for block in blocks)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.02)


def random_mask(n_out: int, n_in: int, density: float, seed: int = 0) -> torch.Tensor:
    """(n_out, n_in) bool mask with exactly round(density * n_out * n_in) links, uniformly placed."""
    total = n_out * n_in
    gen = torch.Generator().manual_seed(seed)
    keep = torch.randperm(total, generator=gen)[: max(1, round(density * total))]
    mask = torch.zeros(total, dtype=torch.bool)
    mask[keep] = True
    return mask.view(n_out, n_in)


def best_seconds(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn``."""
    return min(interleaved({"call": lambda rep: fn()}, repeats)["call"])


# ------------------------------------------------------------------------------------ the benchmarks
def predictor_cost(s: dict, args) -> dict:
    torch.set_num_threads(args.threads or s["threads"])
    size, rows, measured = s["size"], [], []
    for density in sorted(s["densities"]):
        mask = random_mask(size, size, density)
        degree = mask.sum().item() / size  # mean links per node
        row = {"size": size, "density": density, "mean_degree": round(degree, 1)}
        row["l3n_s"] = round(best_seconds(lambda m=mask: l3n_scores(m, "CH3"), s["repeats"]), 4)
        if density <= s["l3p_max_density"]:
            row["l3p_s"] = round(best_seconds(lambda m=mask: l3p_scores(m, "CH3"), s["repeats"]), 4)
            row["l3p"] = "measured"
            measured.append((degree, row["l3p_s"]))
        elif measured:
            d0, t0 = measured[-1]
            row["l3p_s"] = float(f"{t0 * (degree / d0) ** 3:.4g}")  # 4 digits: a fast run extrapolates < 1 s
            row["l3p"] = "extrapolated (d^3 from the last measured point)"
        if "l3p_s" in row:
            row["l3p_over_l3n"] = round(row["l3p_s"] / row["l3n_s"], 2)
        rows.append(row)
        print(f"predictor_cost: {row}", flush=True)
    exponent = None  # of L3p's time in the degree, between the first and last measured points
    if len(measured) >= 2 and measured[0][1] > 0:
        (d0, t0), (d1, t1) = measured[0], measured[-1]
        exponent = round(math.log(t1 / t0) / math.log(d1 / d0), 2)
    print(f"L3p time grows as degree^{exponent} between the measured densities (theory: 3 at large d).")
    out = {"environment": environment("cpu"), "threads": torch.get_num_threads(), "rows": rows}
    out["l3p_degree_exponent"] = exponent
    return out | {"table": "size density mean_degree l3n_s l3p_s l3p_over_l3n l3p"}


def _update_row(name: str, device: str, repeats: int) -> dict:
    cuda = device.startswith("cuda")
    model = SparseSubset(*SHAPES[name], dtype=torch.bfloat16 if cuda else torch.float32, device=device)
    cfg = CHTssConfig(final_density=0.3, initial_density=0.5, update_interval=100, zeta=0.1, seed=0)
    ctl = CHTssController(model, None, cfg, total_steps=100 * 40)
    masks = [layer.mask for layer in ctl.layers]
    rewiring = Rewiring(ctl.layers, ctl.config, ctl.gradients)

    def batched():
        timer = [0.0]
        for _ in rewiring.scored_batches(masks, timer):
            pass
        return timer[0]

    def per_matrix():  # the reference approach: one predictor call per matrix, no batching
        with timed(device) as t:
            for m in masks:
                l3n_scores(m, "CH2", chunk=1 << 30, allow_tf32=cfg.allow_tf32)
        return t.ms

    if cuda:
        batched(), per_matrix()  # warm-up (kernels, allocator)
    t_batched = [batched() for _ in range(repeats)]
    t_loop = [per_matrix() for _ in range(repeats)]
    t_update = []
    for u in range(1, repeats + 1):
        with timed(device) as t:
            ctl.update(u)
        t_update.append(t.ms)
    row = {"model": name, "device": device, "matrices": len(masks)}
    row |= {"sparse_subset_weights": sum(p.numel() for p in model.parameters()), "density": 0.3}
    row["predictor_batched_ms"] = statistics.median(t_batched)
    row["predictor_per_matrix_ms"] = statistics.median(t_loop)
    row |= {"full_update_ms": statistics.median(t_update), "repeats": repeats}
    row["batched_speedup"] = row["predictor_per_matrix_ms"] / row["predictor_batched_ms"]
    target = 2000.0 if name == "llama7b" else 50.0
    met = "met" if row["full_update_ms"] <= target else "not met"
    return {**row, "target": f"<= {target:g} ms on a GPU: {met}"}


def update_cost(s: dict, args) -> dict:
    cuda = args.device.startswith("cuda")
    shapes, repeats = (s["cuda_shapes"], s["cuda_repeats"]) if cuda else (s["shapes"], s["repeats"])
    rows = [_update_row(name, args.device, repeats) for name in shapes]
    columns = "model device matrices predictor_per_matrix_ms predictor_batched_ms batched_speedup"
    columns += " full_update_ms target"
    return {"environment": environment(args.device), "rows": rows, "table": columns}


def _tensors(obj, seen: set[int], depth: int = 0):
    """Tensors reachable from ``obj`` through attributes, dicts, lists (not through modules, optimizers)."""
    if depth > 4 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (nn.Module, torch.optim.Optimizer, torch.Generator)):
        return
    elif isinstance(obj, (dict, list, tuple)) or hasattr(obj, "__dict__"):
        values = vars(obj).values() if hasattr(obj, "__dict__") else obj
        for v in obj.values() if isinstance(obj, dict) else values:
            yield from _tensors(v, seen, depth + 1)


def held_bytes(controller: CHTssController) -> int:
    """Bytes of distinct tensor storages the controller holds outside the model's parameters."""
    params = {p.untyped_storage().data_ptr() for p in controller.model.parameters()}
    held = [t.untyped_storage() for t in _tensors(controller, set())]
    storages = {s.data_ptr(): s.nbytes() for s in held}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def mask_memory(s: dict, args) -> dict:
    hidden, inter, blocks, heads, kv = SHAPES[s["shape"]]
    out = Path(args.path)
    rows = json.loads(out.read_text()).get("rows", []) if out.is_file() else []
    rows = [r for r in rows if r.get("label") != args.label]
    source = Path(leanformers.__file__).resolve().parents[1]
    for name in s["dtypes"]:
        dtype, device = getattr(torch, name), args.device
        torch.manual_seed(0)
        model = SparseSubset(hidden, inter, blocks, heads, kv, dtype, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        config = CHTssConfig(final_density=0.3, update_interval=1, regrowth="random")
        ctl = CHTssController(model, opt, config, total_steps=100)
        x = torch.randn(4, hidden, dtype=dtype, device=device)
        for block in model.layers:  # one step touching every matrix, then the topology update of step 1
            a, m = block.self_attn, block.mlp
            group = heads // kv
            y = a.o_proj(a.q_proj(x) + a.k_proj(x).repeat(1, group) + a.v_proj(x).repeat(1, group))
            m.down_proj(m.gate_proj(y) * m.up_proj(y)).float().pow(2).mean().backward()
        opt.step()
        ctl.step()
        opt.zero_grad()
        weights = sum(layer.mask.numel() for layer in ctl.layers)
        held = held_bytes(ctl)
        ctl.apply_masks_()
        with timed(device) as t:
            for _ in range(s["repeats"]):
                ctl.apply_masks_()
        row = {"shape": s["shape"], "dtype": name, "device": device, "sparse_weights": weights}
        row |= {"mask_bytes": held, "bytes_per_weight": held / weights, "remask_ms": t.ms / s["repeats"]}
        row |= {"label": args.label, "command": args.command, "leanformers_source": str(source)}
        rows.append(row | {"environment": environment()})
    return {"rows": rows, "table": "label shape dtype sparse_weights bytes_per_weight remask_ms"}


GiB, FP32, ADAM_MOMENTS = 1024**3, 4, 2


def shard_numel(t: torch.Tensor, world: int) -> int:
    """Elements of the largest dim-0 shard of ``t`` over ``world`` ranks (FSDP2 pads dim 0)."""
    if t.numel() == 0:
        return 0
    rows = t.shape[0] if t.dim() else 1
    return -(-rows // world) * (t.numel() // rows)


def per_gpu(model: nn.Module, world: int, mask_numel: int = 0) -> dict:
    """GiB per GPU of parameters, fp32 gradients and AdamW moments of trainable ones, and the method's
    state (``mask_numel`` CHTss bool mask elements, sharded; buffers replicated) under FSDP2."""
    params = sum(shard_numel(p, world) * p.element_size() for p in model.parameters())
    grads = sum(shard_numel(p, world) * FP32 for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    out = {"params": params, "grads": grads, "moments": grads * ADAM_MOMENTS}
    out["method_state"] = -(-mask_numel // world) + buffers
    out["total"] = sum(out.values())
    return {k: round(v / GiB, 6) for k, v in out.items()}


def peak_unit(model: nn.Module) -> float:
    """GiB the running FSDP unit adds: the largest block's whole parameters (+ SST's dense weight)."""
    from leanformers.sst import find_sst_layers

    worst = 0
    for block in (m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"):
        nbytes = sum(p.numel() * p.element_size() for p in block.parameters())
        sst = find_sst_layers(block)
        if sst:
            nbytes += max(m.out_features * m.in_features for m in sst.values()) * FP32
        worst = max(worst, nbytes)
    return round(worst / GiB, 6)


def scaling_memory(s: dict, args) -> dict:
    """Dense, CHTss at 30 % (one bool per sparse weight, sharded; an update's transient: 2 bytes per sparse
    weight + 4 fp32 copies of the largest matrix) and SST (frozen U/Vh as FSDP2-sharded parameters, as
    SSTCallback makes them) at each rank and frozen dtype; activations are not counted."""
    import re

    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from leanformers.chts.config import DEFAULT_TARGETS
    from leanformers.sst import SSTConfig, frozen_factors_as_parameters

    def build(shape):
        cfg = llama_config(*shape, vocab=s["vocab"], max_positions=2048, tie_word_embeddings=False)
        with torch.device("meta"):
            return LlamaForCausalLM(cfg)

    rows, pattern = [], [re.compile(p) for p in DEFAULT_TARGETS]
    for name, shape in s["models"].items():
        dense = build(shape)
        linears = [(n, m) for n, m in dense.named_modules() if isinstance(m, nn.Linear)]
        sparse = [m.weight.numel() for n, m in linears if any(p.search(n) for p in pattern)]
        ranks = [r if isinstance(r, int) else shape[0] // int(r.split("/")[1]) for r in s["sst_ranks"]]
        ssts = []
        for r in ranks:
            for dtype in ("float32", "bfloat16"):
                kw = {"target_modules": "all-linear", "mode": "pretrain", "frozen_factor_dtype": dtype}
                config = SSTConfig(r=r, **kw)
                model = get_peft_model(build(shape), config)
                frozen_factors_as_parameters(model)  # what SSTCallback does for FSDP2
                ssts.append((r, dtype, model))
        for world in s["worlds"]:
            base = {"model": name, "parameters_M": round(sum(p.numel() for p in dense.parameters()) / 1e6, 1)}
            base |= {"world": world}
            rows.append({**base, "method": "dense", **per_gpu(dense, world), "peak_unit": peak_unit(dense)})
            chtss = {**base, "method": "chtss d=0.3", **per_gpu(dense, world, sum(sparse))}
            transient = (2 * sum(sparse) + 4 * FP32 * max(sparse)) / GiB
            rows.append(chtss | {"peak_unit": peak_unit(dense), "update_transient": round(transient, 6)})
            for r, dtype, model in ssts:
                frozen = [p for p in model.parameters() if not p.requires_grad]
                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                row = {**base, "method": f"sst r={r} {dtype}", "r": r, "frozen_dtype": dtype}
                row |= {**per_gpu(model, world), "peak_unit": peak_unit(model)}
                row["sst_trainable_M"] = round(trainable / 1e6, 1)
                row["frozen_U_Vh_GiB"] = round(sum(p.numel() * p.element_size() for p in frozen) / GiB, 6)
                per_gpu_bytes = sum(shard_numel(p, world) * p.element_size() for p in frozen)
                rows.append(row | {"frozen_U_Vh_per_gpu_GiB": round(per_gpu_bytes / GiB, 6)})
    out = {"command": args.command, "leanformers": leanformers.__version__, "rows": rows}
    out["environment"] = {**environment(), "device": "meta (shapes only: computed, not measured)"}
    out["units"] = (
        "GiB per GPU under FSDP2 (dim-0 shards): fp32 parameters (SST's frozen U/Vh at frozen_dtype, "
        "sharded) / gradients / AdamW moments of trainable parameters, method state (CHTss masks sharded, "
        "buffers replicated); peak_unit and update_transient are transient, not in total"
    )
    out["table"] = "model world method params grads moments method_state total peak_unit update_transient"
    return out


def _generate(model, ids, new: int) -> tuple[torch.Tensor, float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    return out, time.perf_counter() - start, time.process_time() - cpu


def sst_generate(s: dict, args) -> dict:
    """Three variants of one SST model (SSTConfig(r) at init): merged (merge_and_unload of a copy), sst
    (as shipped: the effective weight cached), sst_uncached (rebuilt in every forward)."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from leanformers.sst import SSTConfig, SSTLinear

    p = s["model"]
    torch.manual_seed(0)
    shape = (p["hidden"], p["ffn"], p["layers"], p["heads"])
    cfg = llama_config(*shape, vocab=p["vocab"], max_positions=512, tie_word_embeddings=False)
    sst = get_peft_model(LlamaForCausalLM(cfg), SSTConfig(r=p["r"])).eval()
    merged = copy.deepcopy(sst).merge_and_unload().eval()
    models = {"merged": merged, "sst": sst, "sst_uncached": copy.deepcopy(sst)}
    for layer in models["sst_uncached"].modules():
        if isinstance(layer, SSTLinear):
            layer.inference_cache = False
    ids = torch.randint(0, p["vocab"], (s["batch"], p["prompt"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = {name: m(ids).logits for name, m in models.items()}
    outputs = {name: _generate(m, ids, p["new"])[0] for name, m in models.items()}  # warm-up, reference
    names, times, cpu = list(models), {n: [] for n in models}, {n: [] for n in models}
    for rep in range(s["repeats"]):
        for name in names[rep % 3 :] + names[: rep % 3]:  # rotate: no variant always goes first
            out, seconds, cpu_seconds = _generate(models[name], ids, p["new"])
            times[name].append(seconds)
            cpu[name].append(cpu_seconds)
            assert torch.equal(out, outputs[name]), f"{name}: greedy generation is not deterministic"

    def ratio(name, series):
        return statistics.median(a / b for a, b in zip(series[name], series["merged"], strict=True))

    rows = []
    for n in names:
        row = {"variant": n, "median_s": round(statistics.median(times[n]), 4)}
        row["vs_merged"] = round(ratio(n, times), 3)
        row |= {"median_cpu_s": round(statistics.median(cpu[n]), 4), "cpu_vs_merged": round(ratio(n, cpu), 3)}
        rows.append(row | {"tokens_equal_merged": bool(torch.equal(outputs[n], outputs["merged"]))})
    out = {"benchmark": "sst_generate", "preset": "quick" if args.quick else "default"}
    out |= {"model": {**p, "batch": s["batch"]}, "repeats": s["repeats"], "times_s": times}
    out["cpu_times_s"] = cpu
    out |= {"rows": rows, "ratio_sst_vs_merged": ratio("sst", times)}
    out["ratio_uncached_vs_merged"] = ratio("sst_uncached", times)
    out["cpu_ratio_sst_vs_merged"] = ratio("sst", cpu)
    out |= {"cpu_ratio_uncached_vs_merged": ratio("sst_uncached", cpu), "target_ratio": 1.2}
    out["max_logit_diff_sst_vs_uncached"] = float((logits["sst"] - logits["sst_uncached"]).abs().max())
    out["max_logit_diff_sst_vs_merged"] = float((logits["sst"] - logits["merged"]).abs().max())
    out["tokens_identical"] = all(torch.equal(outputs[n], outputs["merged"]) for n in names)
    out |= {"environment": environment(), "table": "variant median_s vs_merged median_cpu_s cpu_vs_merged"}
    out["table"] += " tokens_equal_merged"
    return out


BENCHES = {  # bench -> (function, its settings)
    "predictor_cost": (predictor_cost, {"size", "densities", "l3p_max_density", "repeats", "threads"}),
    "update_cost": (update_cost, {"shapes", "cuda_shapes", "repeats", "cuda_repeats"}),
    "mask_memory": (mask_memory, {"shape", "dtypes", "repeats"}),
    "scaling_memory": (scaling_memory, {"models", "vocab", "worlds", "sst_ranks"}),
    "sst_generate": (sst_generate, {"model", "repeats", "batch"}),
}


def row_keys(name: str, row: dict) -> set[str]:
    if row.get("bench") not in BENCHES:
        raise ValueError(f"bench/rows/micro.yaml: row {name!r}: bench must be one of {', '.join(BENCHES)}")
    return {"bench", "quick", *BENCHES[row["bench"]][1]}


ROWS = load_rows("micro", row_keys)


def build_parser():
    ap = harness.parser(__doc__, "every row at its quick size (seconds, CPU)", "result JSON (one row only)")
    harness.rows_arguments(ap, ROWS, default=list(ROWS))
    ap.add_argument("--repeats", type=int, default=None, help="the rows' repeats (--set repeats=N)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--label", default="current", help="mask_memory: row label, e.g. before / after")
    return ap


def main(argv: list[str] | None = None) -> dict:
    """Runs the rows; returns {row: the payload written to its JSON}."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.output is not None and len(args.rows) != 1:
        ap.error("--output takes one row (each row writes its own JSON)")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.command, results = harness.command_line("micro", argv), {}
    for name in args.rows:
        sets = args.sets + ([f"repeats={args.repeats}"] if args.repeats and "repeats" in ROWS[name] else [])
        settings = row_settings(name, ROWS[name], args.quick, sets)
        args.path = harness.output_path(args, name)
        payload = BENCHES[settings["bench"]][0](settings, args)
        columns = payload.pop("table")
        results[name] = payload
        harness.write_json(args.path, payload)
        print(f"\n{name} (JSON: {args.path})")
        print_table(payload["rows"], columns)
    return results


if __name__ == "__main__":
    main()
