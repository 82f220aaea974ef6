"""Cost of the exact path-based CH3-L3p predictor (O(N d^3)) vs the node-based CH3-L3n (O(N^3)) by density.

The CHTs abstract: CHT's "time complexity is O(Nd^3) ... hence it can apply only to ultra-sparse
networks", and the GPU-friendly node-based approximation "reduces the computational complexity to
O(N^3)". One random (out, in) mask per density (Erdos-Renyi, seed 0), both predictors timed side by
side in one run (``leanformers.chts.predictors.l3p_scores`` / ``l3n_scores``, variant CH3), best of
``--repeats``. The L3p column stops at ``--l3p-max-density``; above it, the time is extrapolated
from the last two measured points with the d^3 law (marked "extrapolated").

    python bench/chts_predictor_cost.py --quick          # 128 x 128, seconds (CI smoke)
    python bench/chts_predictor_cost.py                  # 1568 x 1568 (the CHT MLP's hidden layer)

Prints a table last and writes bench/results/chts_predictor_cost.json.
"""

from __future__ import annotations

import math
import sys

import torch
from harness import environment, output_path, parser, print_table, timed, write_json

from leanformers.chts.predictors import l3n_scores, l3p_scores


def random_mask(n_out: int, n_in: int, density: float, seed: int = 0) -> torch.Tensor:
    """(n_out, n_in) bool mask with exactly round(density * n_out * n_in) links, uniformly placed."""
    gen = torch.Generator().manual_seed(seed)
    total = n_out * n_in
    keep = torch.randperm(total, generator=gen)[: max(1, round(density * total))]
    mask = torch.zeros(total, dtype=torch.bool)
    mask[keep] = True
    return mask.view(n_out, n_in)


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        with timed("cpu") as t:
            fn()
        times.append(t.seconds)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__.split("\n\n")[0], "128 x 128 mask, densities up to 0.2 (CI smoke test)")
    ap.add_argument("--size", type=int, default=None, help="square mask side (default 1568; quick 128)")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2, 0.3])
    ap.add_argument("--l3p-max-density", type=float, default=None, help="default 0.05 (quick 0.2)")
    ap.add_argument("--repeats", type=int, default=None, help="best of N (default 2; quick 1)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    size = args.size or (128 if args.quick else 1568)
    l3p_max = args.l3p_max_density or (0.2 if args.quick else 0.05)
    repeats = args.repeats or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    rows, measured = [], []
    for density in sorted(args.densities):
        mask = random_mask(size, size, density)
        degree = mask.sum().item() / size  # mean links per node (out side; in side is the same)
        row = {"size": size, "density": density, "mean_degree": round(degree, 1)}
        row["l3n_s"] = round(best_seconds(lambda m=mask: l3n_scores(m, "CH3"), repeats), 4)
        print(f"chts_predictor_cost: density {density} l3n {row['l3n_s']} s", file=sys.stderr, flush=True)
        if density <= l3p_max:
            row["l3p_s"] = round(best_seconds(lambda m=mask: l3p_scores(m, "CH3"), repeats), 4)
            row["l3p"] = "measured"
            measured.append((degree, row["l3p_s"]))
        elif measured:
            d0, t0 = measured[-1]
            row["l3p_s"] = round(t0 * (degree / d0) ** 3, 1)
            row["l3p"] = "extrapolated (d^3 from the last measured point)"
        if "l3p_s" in row:
            row["l3p_over_l3n"] = round(row["l3p_s"] / row["l3n_s"], 2)
        rows.append(row)
        print(f"chts_predictor_cost: {row}", file=sys.stderr, flush=True)
    # empirical exponent of L3p's time in the degree, between the first and last measured points
    exponent = None
    if len(measured) >= 2 and measured[0][1] > 0:
        (d0, t0), (d1, t1) = measured[0], measured[-1]
        exponent = round(math.log(t1 / t0) / math.log(d1 / d0), 2)
    result = {
        "environment": environment("cpu"),
        "threads": args.threads,
        "rows": rows,
        "l3p_degree_exponent": exponent,
    }
    out = write_json(output_path(args, "chts_predictor_cost"), result)
    print(f"JSON: {out}", file=sys.stderr)
    print(f"L3p time grows as degree^{exponent} between the measured densities (theory: 3 at large d).")
    print_table(rows, ["size", "density", "mean_degree", "l3n_s", "l3p_s", "l3p_over_l3n", "l3p"])
    return result


if __name__ == "__main__":
    main()
