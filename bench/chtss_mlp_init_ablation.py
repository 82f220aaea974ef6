"""Ablation of docs/benchmarks.md §8: the official MLP presets with ER instead of correlated init.

Same sizes, epochs, updates and seeds as the §6 rows (784-1568-1568-1568-10, 1 %, 3 epochs, 2 updates
per epoch, seeds 0-2, classifier dense); only ``init_topology="er"`` differs. Writes the rows to the
JSON path given as the first argument (one row appended per run).

    nice -n 15 python bench/chtss_mlp_init_ablation.py bench/results/chtss_mlp_official_presets_er_ablation.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from mlp_mnist import train_mlp


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0])
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or give another path (no silent overwrite)")
    torch.set_num_threads(1)
    rows = []
    for seed in range(3):
        for method in ("cht_official", "chts_official_mlp"):
            row = train_mlp(
                method,
                sizes=(784, 1568, 1568, 1568, 10),
                epochs=3,
                seed=seed,
                device="cpu",
                updates_per_epoch=2,
                targets=(r"^layers\.(0|2|4)$",),
                init_topology="er",
            )
            row["method"] = f"{method}+er_init"
            rows.append(row)
            print(row, flush=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(
                json.dumps(
                    {"command": "python bench/chtss_mlp_init_ablation.py " + " ".join(argv), "rows": rows},
                    indent=2,
                )
            )
            tmp.replace(out)  # atomic
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
