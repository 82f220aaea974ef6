"""Conversions between methods: an SST-trained model -> dense, or -> low-rank / PIFA layers.

This module is where sst/ and pifa/ meet (they never import each other).

- :func:`sst_to_dense`: ``merge_and_unload()`` of an SST PeftModel (plain nn.Linear / Conv1D).
- :func:`sst_to_lowrank`: every SST layer becomes a spectrum-truncated ``PIFALinear`` (or
  ``LowRankLinear``) of its effective weight U_eff diag(S) Vh_eff; everything else keeps its trained
  values. The result is a plain transformers model that :func:`leanformers.save_compressed`
  writes as a Hugging Face folder reloadable with ``AutoModelForCausalLM.from_pretrained`` (after
  ``import leanformers``), exactly like an ``mpifa-compress`` output.
- :func:`sst_spectra`: the singular values of every SST layer (for plots).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["choose_rank", "save_sst_as_pifa", "sst_spectra", "sst_to_dense", "sst_to_lowrank"]


def _sst_layers(model: nn.Module) -> dict[str, nn.Module]:
    from leanformers.sst.layer import find_sst_layers

    return find_sst_layers(model, required=True)


def sst_to_dense(model: nn.Module) -> nn.Module:
    """Merge an SST PeftModel into a plain model with dense nn.Linear / Conv1D layers."""
    _sst_layers(model)
    return model.merge_and_unload()


@torch.no_grad()
def sst_spectra(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: singular values (k,) of its effective weight, descending, float32, CPU}."""
    from leanformers.sst.spectral import thin_svd

    out = {}
    for name, layer in _sst_layers(model).items():
        _, S, _ = thin_svd(layer.effective_weight())
        out[name] = S.cpu()
    return out


def choose_rank(
    S: torch.Tensor,
    out_features: int,
    in_features: int,
    *,
    rank: int | None = None,
    density: float | None = None,
    energy: float | None = None,
    layout: str = "pifa",
) -> int:
    """Rank of a truncated layer from exactly one of ``rank``, ``density`` or ``energy``.

    Args:
        S: (k,) singular values, descending.
        rank: fixed rank (capped at k).
        density: stored weights / dense weights (PIFA: r(m+n) - r^2, low-rank: r(m+n)).
        energy: smallest r with sum(S[:r]^2) >= energy * sum(S^2).
    """
    given = [x is not None for x in (rank, density, energy)]
    if sum(given) != 1:
        raise ValueError("pass exactly one of rank=, density= or energy= to choose the truncation rank")
    k = S.numel()
    if rank is not None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        return min(int(rank), k)
    if density is not None:
        from leanformers.storage.rank import lowrank_rank, pifa_rank

        choose = pifa_rank if layout == "pifa" else lowrank_rank
        return min(choose(out_features, in_features, density), k)
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    cumulative = torch.cumsum(S.double() ** 2, 0) / (S.double() ** 2).sum()
    return int(min(k, int((cumulative < energy - 1e-12).sum()) + 1))


@torch.no_grad()
def sst_to_lowrank(
    model: nn.Module,
    *,
    rank: int | None = None,
    density: float | None = None,
    energy: float | None = None,
    layout: str = "pifa",
    form: str = "auto",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace every SST layer by a spectrum-truncated PIFA / low-rank layer; return the base model.

    The truncation is the best rank-r approximation of each layer's effective weight (an SVD of
    U_eff diag(S) Vh_eff, since the active vectors drift from orthogonality between re-SVDs).
    The SST PeftModel is consumed (its layers are swapped out); keep a saved adapter if needed.

    Args:
        model: a PeftModel with an SST adapter.
        rank / density / energy: the truncation rule, see :func:`choose_rank`.
        layout: ``"pifa"`` (PIFALinear, r(m+n) - r^2 weights) or ``"lowrank"`` (LowRankLinear).
        form: PIFA form (``"auto"``, ``"row"``, ``"column"``).
        dtype: dtype of the new layers (default: the base layer's dtype).
    """
    from leanformers.sst.spectral import thin_svd
    from leanformers.storage.layers import LowRankLinear, PIFALinear

    if layout not in ("pifa", "lowrank"):
        raise ValueError(f"layout must be 'pifa' or 'lowrank', got {layout!r}")
    layers = _sst_layers(model)
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, layer in layers.items():
        weight = layer.effective_weight()  # (out, in), float32
        U, S, Vh = thin_svd(weight)
        r = choose_rank(
            S, layer.out_features, layer.in_features, rank=rank, density=density, energy=energy, layout=layout
        )
        U_r = U[:, :r] * S[:r]  # the magnitude goes into U: W_r = U_r V_r
        V_r = Vh[:r]
        bias = layer.get_base_layer().bias
        bias = None if bias is None else bias.detach().float()
        target_dtype = dtype or layer.base_dtype
        if layout == "pifa":
            new = PIFALinear.from_factors(U_r, V_r, bias, form=form, dtype=target_dtype)
        else:
            new = LowRankLinear.from_factors(U_r, V_r, bias, dtype=target_dtype)
        new.to(weight.device)
        # module names of the PeftModel start with base_model.model.; those of the base model do not
        local = name.removeprefix("base_model.model.")
        parent_name, _, child = local.rpartition(".")
        parent = base_model.get_submodule(parent_name) if parent_name else base_model
        setattr(parent, child, new)
    if hasattr(base_model, "peft_config"):
        del base_model.peft_config
    return base_model


def save_sst_as_pifa(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    tokenizer=None,
    rank: int | None = None,
    density: float | None = None,
    energy: float | None = None,
    layout: str = "pifa",
    overwrite: bool = False,
) -> Path:
    """:func:`sst_to_lowrank` then write the model with the ``mpifa`` quantization_config, so that
    ``AutoModelForCausalLM.from_pretrained(output_dir)`` (after ``import leanformers``) reloads it."""
    from leanformers.storage.saving import save_compressed

    compressed = sst_to_lowrank(model, rank=rank, density=density, energy=energy, layout=layout)
    return save_compressed(compressed, tokenizer, output_dir, overwrite=overwrite)
