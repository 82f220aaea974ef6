"""What every compressed linear layer shares (``CompressedLinear``): the dense surface (``in_features``,
``out_features``, ``rank``, ``bias``), the spec round trip that the ``quantization_config`` stores, the
dense equivalent, output reordering and the load-hint buffer."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["LOAD_HINT", "SPEC_KEYS", "CompressedLinear", "check_permutation", "check_spec"]

SPEC_KEYS = ("kind", "in_features", "out_features", "rank", "bias")

# A one-byte buffer saved with every compressed module. A process that loads the checkpoint without
# `import leanformers` fails on the size mismatch of `weight`; transformers' load report printed with
# that error then lists this key as UNEXPECTED, which names the fix.
LOAD_HINT = "import_leanformers_before_from_pretrained"


def _register_load_hint(module: nn.Module, device) -> None:
    module.register_buffer(LOAD_HINT, torch.ones(1, dtype=torch.uint8, device=device))


def _check_dims(in_features: int, out_features: int, rank: int) -> None:
    if in_features < 1 or out_features < 1:
        raise ValueError(f"in_features and out_features must be >= 1, got {in_features} and {out_features}")
    if not 1 <= rank <= min(in_features, out_features):
        raise ValueError(
            f"rank must be in [1, min(in_features, out_features) = {min(in_features, out_features)}], got {rank}"
        )


def _factory(dtype, device) -> dict:
    return {"dtype": dtype, "device": device}


class CompressedLinear(nn.Module):
    """What PIFALinear and LowRankLinear share: the dense surface (``in_features``, ``out_features``,
    ``rank``, ``bias``), the spec round trip, ``to_dense``, output reordering and the repr.

    A subclass sets ``kind``, creates its factors in ``_create_factors`` (which receives the layout
    keywords of its constructor), and implements ``dense_weight`` (out, in), ``num_parameters`` and
    ``reset_parameters``. ``weight`` is always the factor whose rows are the output channels in column
    layouts (PIFA column form, low-rank U), so reordering outputs permutes its rows by default.
    """

    kind: str = ""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **layout: Any,
    ) -> None:
        super().__init__()
        _check_dims(in_features, out_features, rank)
        self.in_features, self.out_features, self._rank = int(in_features), int(out_features), int(rank)
        self._create_factors(_factory(dtype, device), **layout)
        # Then the bias (out,), the load-hint buffer, and a random init unless on meta.
        self.bias = nn.Parameter(torch.empty(self.out_features, **_factory(dtype, device))) if bias else None
        _register_load_hint(self, device)
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def _create_factors(self, kw: dict) -> None:
        """Register the factor parameters (and buffers) on ``kw``'s dtype and device."""
        raise NotImplementedError

    @torch.no_grad()
    def _uniform_init_(self, input_side: nn.Parameter, rank_side: nn.Parameter) -> None:
        """nn.Linear-like init: ``input_side`` and the bias U(-1/sqrt(in), 1/sqrt(in)), ``rank_side``
        U(-1/sqrt(rank), 1/sqrt(rank)), drawn in that order."""
        bound = 1.0 / math.sqrt(self.in_features)
        input_side.uniform_(-bound, bound)
        rank_side.uniform_(-1.0 / math.sqrt(self._rank), 1.0 / math.sqrt(self._rank))
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    @classmethod
    def from_factors(
        cls,
        U: torch.Tensor,
        V: torch.Tensor,
        bias: torch.Tensor | None = None,
        form: str = "auto",
        dtype: torch.dtype | None = None,
        **options: Any,
    ):
        """Layer computing x (U V)^T + bias. U: (out, r), V: (r, in), bias: (out,) or None; parameters
        in ``dtype`` (default: the factors' dtype). ``form`` and ``options``: see the subclass's ``_from_uv``."""
        return cls._from_uv(U, V, bias, form=form, dtype=dtype, **options)

    @classmethod
    def _from_uv(cls, U, V, bias, *, form: str, dtype):
        raise NotImplementedError

    @property
    def rank(self) -> int:
        return self._rank

    # -- spec -------------------------------------------------------------------------------------
    def _layout_spec(self) -> dict[str, Any]:
        """Layout keys of the spec (between ``rank`` and ``bias``)."""
        return {}

    def _flag_spec(self) -> dict[str, bool]:
        """Boolean keys of the spec after ``bias`` (shown in the repr only when True)."""
        return {}

    def spec(self) -> dict[str, Any]:
        """JSON-able description; ``from_spec(spec)`` rebuilds an empty layer of the same layout."""
        return {
            "kind": self.kind,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self._rank,
            **self._layout_spec(),
            "bias": self.bias is not None,
            **self._flag_spec(),
        }

    @classmethod
    def _kwargs_from_spec(cls, spec: dict) -> dict[str, Any]:
        """Constructor keywords of the subclass read from a (checked) spec."""
        return {}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype | None = None, device=None, **options: Any):
        """Empty layer (uninitialised on meta) of the layout ``spec`` describes; ``options``: storage
        keywords of the subclass that the spec does not hold (PIFALinear: ``coefficient_dtype``)."""
        check_spec(spec, cls.kind)
        return cls(
            int(spec["in_features"]),
            int(spec["out_features"]),
            int(spec["rank"]),
            bias=bool(spec["bias"]),
            **cls._kwargs_from_spec(spec),
            **options,
            dtype=dtype,
            device=device,
        )

    def extra_repr(self) -> str:
        flags = self._flag_spec()
        return ", ".join(
            f"{k}={v}" for k, v in self.spec().items() if k != "kind" and not (k in flags and not v)
        )

    # -- dense equivalent --------------------------------------------------------------------------
    def dense_weight(self) -> torch.Tensor:
        """W (out, in) such that forward(x) == x W^T + b."""
        raise NotImplementedError

    def to_dense(self) -> nn.Linear:
        """An nn.Linear with the same function (weight computed with fp32 accumulation)."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            dtype=self.weight.dtype,
            device=self.weight.device,
        )
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # -- channel order ---------------------------------------------------------------------------
    def _permute_output_factor_(self, order: torch.Tensor) -> None:
        self.weight.copy_(self.weight.index_select(0, order))

    @torch.no_grad()
    def permute_outputs_(self, order: torch.Tensor):
        """In place: from now on the layer emits y[..., order] (order: (out,) permutation)."""
        order = check_permutation(order, self.out_features).to(self.weight.device)
        self._permute_output_factor_(order)
        if self.bias is not None:
            self.bias.copy_(self.bias.index_select(0, order))
        return self


def check_spec(spec: dict, kind: str) -> None:
    if not isinstance(spec, dict):
        raise TypeError(f"a module spec must be a dict, got {type(spec).__name__}")
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"module spec {spec} lacks {missing}: build specs with layer.spec()")
    if spec["kind"] != kind:
        raise ValueError(f"spec kind {spec['kind']!r} cannot build a {kind!r} layer")


def check_permutation(order: torch.Tensor, size: int) -> torch.Tensor:
    order = torch.as_tensor(order).long()
    if order.shape != (size,) or not torch.equal(torch.sort(order.cpu()).values, torch.arange(size)):
        raise ValueError(f"order must be a permutation of range({size}), got shape {tuple(order.shape)}")
    return order
