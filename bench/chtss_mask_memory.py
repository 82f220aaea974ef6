"""Issue 7 — CHTss mask memory: persistent bytes the scheduler holds per sparse weight.

The scheduler's masks are counted from the object graph (every tensor held by the scheduler and its
sparse layers that is not a model parameter, distinct storages once), after one training step
(optimizer moments exist) and one topology update. Also timed: one re-masking pass
(``apply_masks_``: weights and Adam moments), the work done after every optimizer step.

    python bench/chtss_mask_memory.py --quick --label after        # CPU, LLaMA-like subset, 2 blocks
    python bench/chtss_mask_memory.py --label after                # LLaMA-130M sparse subset (84.9M)

Rows of other labels already in the output JSON are kept (before/after of a change in one file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment  # noqa: E402
from chtss_train import SparseSubset  # noqa: E402

import leanformers  # noqa: E402
from leanformers.chts import CHTssConfig, CHTssScheduler  # noqa: E402

SHAPES = {  # hidden, intermediate, blocks, heads, kv heads
    "quick": (256, 688, 2, 4, 4),
    "llama130m": (768, 2048, 12, 12, 12),
}


def _tensors(obj, params: set[int], seen: set[int], depth: int = 0):
    """Tensors reachable from ``obj`` through attributes, dicts, lists (not through nn.Modules)."""
    if depth > 4 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (torch.nn.Module, torch.optim.Optimizer, torch.Generator)):
        return
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, params, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, params, seen, depth + 1)
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from _tensors(v, params, seen, depth + 1)


def mask_bytes(sched: CHTssScheduler) -> int:
    """Bytes of distinct tensor storages the scheduler holds outside the model's parameters."""
    params = {p.untyped_storage().data_ptr() for p in sched.model.parameters()}
    storages: dict[int, int] = {}
    for t in _tensors(sched, params, set()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
    return sum(storages.values())


def measure(shape: str, dtype: torch.dtype, device: str, repeats: int) -> dict:
    hidden, inter, blocks, heads, kv = SHAPES[shape]
    torch.manual_seed(0)
    model = SparseSubset(hidden, inter, blocks, heads, kv, dtype, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = CHTssConfig(final_density=0.3, update_interval=1, regrowth="random")
    sched = CHTssScheduler(model, opt, cfg, total_steps=100)
    x = torch.randn(4, hidden, dtype=dtype, device=device)
    for block in model.layers:  # one step touching every matrix, then the topology update of step 1
        a = block.self_attn
        y = a.o_proj(a.q_proj(x) + a.k_proj(x).repeat(1, heads // kv) + a.v_proj(x).repeat(1, heads // kv))
        y = block.mlp.down_proj(block.mlp.gate_proj(y) * block.mlp.up_proj(y))
        y.float().pow(2).mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    weights = sum(layer.mask.numel() for layer in sched.layers)
    held = mask_bytes(sched)
    sched.apply_masks_()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        sched.apply_masks_()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    remask_ms = (time.perf_counter() - start) * 1000.0 / repeats
    return {
        "shape": shape,
        "dtype": str(dtype).replace("torch.", ""),
        "device": device,
        "sparse_weights": weights,
        "mask_bytes": held,
        "bytes_per_weight": held / weights,
        "remask_ms": remask_ms,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 small LLaMA-like blocks (CPU, CI)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--label", default="current", help="row label, e.g. before / after")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--output", default=None, help="JSON path (default bench/results/chtss_mask_memory[_quick].json)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = "quick" if args.quick else "llama130m"
    out = (
        Path(args.output)
        if args.output
        else RESULTS / f"chtss_mask_memory{'_quick' if args.quick else ''}.json"
    )
    rows = []
    if out.is_file():
        rows = [r for r in json.loads(out.read_text()).get("rows", []) if r.get("label") != args.label]
    command = "python bench/chtss_mask_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name in args.dtypes.split(","):
        row = measure(shape, getattr(torch, name), args.device, args.repeats)
        row["label"] = args.label
        row["command"] = command
        row["leanformers_source"] = str(Path(leanformers.__file__).resolve().parents[1])  # which checkout ran
        row["environment"] = environment()
        print(json.dumps({k: v for k, v in row.items() if k != "environment"}), flush=True)
        rows.append(row)
    payload = {"rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(out)
    return payload


if __name__ == "__main__":
    main()
