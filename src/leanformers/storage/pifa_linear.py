"""PIFA and low-rank linear layers (drop-in replacements for nn.Linear).

PIFALinear stores a rank-r weight W (out x in) as its pivot block ``weight`` and coefficients
``coeff`` (see factorize.py) plus ONE int32 permutation buffer, the gather its forward needs:

* column form (default for tall and square W): ``input_index`` (n,) = [pivots, nonpivots].
  forward: xp = x[..., input_index]; z = xp[..., :r] + xp[..., r:] @ coeff^T; y = z @ weight^T + b
  (one input gather, two GEMMs, no output scatter). With ``input_permuted=True`` the input already
  arrives in pivot-first order (an upstream layer emits it, see ``emit_in_order_``) and the gather
  is skipped: the two GEMMs read contiguous slices.
* row form (default for wide W): ``output_index`` (m,) = inverse of [pivots, nonpivots].
  forward: z = x @ weight^T; y = cat(z, z @ coeff^T)[..., output_index] + b (one output gather
  instead of the reference's two index_copy_ scatters).

The pivot block is deliberately named ``weight``: its shape (r, n) or (m, r) differs from the dense
(m, n), so a process that loads a checkpoint without the registered quantizer fails with a size
mismatch instead of silently keeping random weights. Pivots are sorted, so at full rank ``weight``
IS the dense W (and a dense load is then exact).

Coefficient storage (``coefficient_dtype``): in a bf16 model, C stored in bf16 perturbs W 2-3x more
than a bf16 U V of the same matrix (C multiplies every pivot row it combines, so its rounding adds
up). By default ("auto") a bf16 PIFA layer keeps C in float16 (three more mantissa bits, the same
bytes); the forward then computes the C product in float32 and rounds its result once. The choice
follows the layer through ``.to()`` / ``.half()`` / ``.bfloat16()``, construction on meta and
checkpoint loading; docs/pifa_format.md has the table and docs/benchmarks.md §13 the measurement.

Forward has no data-dependent Python control flow and no host sync (CUDA graphs, torch.compile).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanformers.storage.base import CompressedLinear
from leanformers.storage.coefficients import (
    check_coefficient_setting,
    checked_cast,
    coefficient_storage_dtype,
)
from leanformers.storage.factorize import (
    FORMS,
    PIFAFactors,
    normalize_form,
    pifa_from_factors,
    pifa_from_weight,
    pifa_to_dense,
)
from leanformers.storage.rank import pifa_num_params

__all__ = ["PIFALinear", "auto_form", "emit_in_order_", "set_coefficient_dtype_"]


def auto_form(out_features: int, in_features: int) -> str:
    """Form whose one gather touches the smaller side: column (gathers the input) for tall and
    square W (m >= n), row (gathers the output) for wide W (m < n)."""
    return "column" if out_features >= in_features else "row"


class PIFALinear(CompressedLinear):
    """y = x W^T + b with W (out_features x in_features) of rank ``rank`` stored in PIFA form.

    Parameters: ``weight`` (pivot block; row form (r, in), column form (out, r)), ``coeff``
    (row form (out - r, r), column form (r, in - r)), optional ``bias`` (out,). Buffer (int32,
    persistent): ``output_index`` (row form) or ``input_index`` (column form).
    Input (..., in_features) -> output (..., out_features), any float dtype matching ``weight``.

    ``coefficient_dtype`` (one of COEFFICIENT_DTYPES, default "auto"): the storage of ``coeff`` when
    the layer is 16-bit, kept through every later cast (``coefficient_storage_dtype``). When it
    differs from the input's dtype, the C product runs in the promoted dtype (float32 for bf16 with
    fp16) and is rounded back once, so C is never rounded to the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        form: str = "row",
        input_permuted: bool = False,
        coefficient_dtype: str = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            rank,
            bias,
            dtype,
            device,
            form=form,
            input_permuted=input_permuted,
            coefficient_dtype=coefficient_dtype,
        )

    def _create_factors(self, kw: dict, form: str, input_permuted: bool, coefficient_dtype: str) -> None:
        self.coefficient_dtype = check_coefficient_setting(coefficient_dtype)
        ckw = {**kw, "dtype": coefficient_storage_dtype(kw["dtype"], coefficient_dtype)}
        form = normalize_form(form)
        if input_permuted and form != "column":
            raise ValueError(
                "input_permuted=True needs form='column' (only the column form gathers its input)"
            )
        self._form = form
        self.input_permuted = bool(input_permuted)
        m, n, r = self.out_features, self.in_features, self._rank
        device = kw["device"]
        if form == "row":
            self.weight = nn.Parameter(torch.empty(r, n, **kw))
            self.coeff = nn.Parameter(torch.empty(m - r, r, **ckw))
            self.register_buffer("output_index", torch.empty(m, dtype=torch.int32, device=device))
        else:
            self.weight = nn.Parameter(torch.empty(m, r, **kw))
            self.coeff = nn.Parameter(torch.empty(r, n - r, **ckw))
            self.register_buffer("input_index", torch.empty(n, dtype=torch.int32, device=device))

    # -- construction -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """A valid random layer: identity pivots, uniform init scaled like nn.Linear."""
        self._uniform_init_(self.weight, self.coeff)
        with torch.no_grad():
            self._index.copy_(torch.arange(self._index.numel(), dtype=torch.int32))

    @classmethod
    def from_pifa(
        cls,
        factors: PIFAFactors,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        coefficient_dtype: str = "auto",
    ) -> PIFALinear:
        """Layer holding ``factors`` (and ``bias`` (out,)), cast to ``dtype`` (default: the factors'
        dtype); C stored as ``coefficient_dtype`` says."""
        m, n = factors.shape
        dtype = dtype or factors.pivot_weight.dtype
        device = factors.pivot_weight.device
        layer = cls(
            n,
            m,
            factors.rank,
            bias=bias is not None,
            form=factors.form,
            coefficient_dtype=coefficient_dtype,
            dtype=dtype,
            device=device,
        )
        perm = torch.cat([factors.pivots, factors.nonpivots]).long().to(device)
        with torch.no_grad():
            layer.weight.copy_(factors.pivot_weight)
            layer.coeff.copy_(checked_cast(factors.coeff, layer.coeff.dtype))
            if factors.form == "row":
                layer.output_index.copy_(torch.argsort(perm).to(torch.int32))
            else:
                layer.input_index.copy_(perm.to(torch.int32))
            if bias is not None:
                if bias.shape != (m,):
                    raise ValueError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def _from_uv(
        cls, U, V, bias, *, form: str, dtype, method: str = "auto", coefficient_dtype: str = "auto"
    ) -> PIFALinear:
        """``form`` "auto" = ``auto_form``; ``method``: the pivoting of ``pifa_from_factors``."""
        if form == "auto" and U.ndim == 2 and V.ndim == 2:
            form = auto_form(U.shape[0], V.shape[1])
        factors = pifa_from_factors(U, V, form=form, method=method)
        return cls.from_pifa(factors, bias=bias, dtype=dtype, coefficient_dtype=coefficient_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, form: str = "auto") -> PIFALinear:
        """Rank-``rank`` truncated-SVD approximation of an nn.Linear (for tests and benchmarks)."""
        w = linear.weight.detach()
        if form == "auto":
            form = auto_form(*w.shape)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_pifa(pifa_from_weight(w.float(), rank, form=form), bias=bias, dtype=w.dtype)

    # -- description ------------------------------------------------------------------------------
    kind = "pifa"

    @property
    def form(self) -> str:
        return self._form

    @property
    def gather_index(self) -> torch.Tensor:
        """The int32 permutation buffer the forward gathers with: ``output_index`` (row form) or
        ``input_index`` (column form)."""
        return self.output_index if self._form == "row" else self.input_index

    _index = gather_index

    @property
    def num_parameters(self) -> int:
        """Stored weight count r (m + n) - r^2 (bias and int32 indices not counted)."""
        return pifa_num_params(self.out_features, self.in_features, self._rank)

    @property
    def index_bytes(self) -> int:
        """Bytes of the int32 permutation buffer (not a parameter)."""
        return self._index.numel() * self._index.element_size()

    def _layout_spec(self) -> dict[str, Any]:
        return {"form": self._form}

    def _flag_spec(self) -> dict[str, bool]:
        return {"input_permuted": self.input_permuted}

    @classmethod
    def _kwargs_from_spec(cls, spec: dict) -> dict[str, Any]:
        if spec.get("form") not in (*FORMS, "col"):
            raise ValueError(f"PIFA spec needs 'form' in {FORMS}, got {spec.get('form')!r}")
        return {"form": spec["form"], "input_permuted": bool(spec.get("input_permuted", False))}

    def factors(self) -> PIFAFactors:
        """The PIFA this layer holds (pivots of the matrix it applies to its actual input)."""
        r = self._rank
        index = self._index.long()
        perm = torch.argsort(index) if self._form == "row" else index
        if self._form == "column" and self.input_permuted:
            perm = torch.arange(self.in_features, device=index.device)
        return PIFAFactors(
            self.weight.detach(),
            self.coeff.detach(),
            perm[:r].to(torch.int32),
            perm[r:].to(torch.int32),
            self._form,
        )

    def dense_weight(self) -> torch.Tensor:
        """W (out, in) such that forward(x) == x W^T + b (w.r.t. the layer's actual input order)."""
        return pifa_to_dense(self.factors())

    # -- channel order ---------------------------------------------------------------------------
    def _permute_output_factor_(self, order: torch.Tensor) -> None:
        if self._form == "row":  # the output gather absorbs the reorder
            self.output_index.copy_(self.output_index.index_select(0, order))
        else:
            super()._permute_output_factor_(order)

    # -- coefficient storage -------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        # nn.Module.to / half / bfloat16 cast every floating parameter alike; C then takes the dtype
        # its setting asks for, converted from its value BEFORE the cast (never via the rounded one).
        before = self.coeff.data
        super()._apply(fn, recurse)
        want = coefficient_storage_dtype(self.weight.dtype, self.coefficient_dtype)
        if self.coeff.dtype != want and self.coeff.dtype.is_floating_point:
            with torch.no_grad():
                before = before.to(self.coeff.device)
                try:
                    self.coeff.data = checked_cast(before, want)
                except OverflowError:
                    self.coeff.data = before  # unrounded, so that the fix the error names still applies
                    raise
                if self.coeff.grad is not None:
                    self.coeff.grad = self.coeff.grad.to(want)
        return self

    def set_coefficient_dtype_(self, setting: str) -> PIFALinear:
        """In place: store C as ``setting`` (COEFFICIENT_DTYPES) says from now on (converts C now)."""
        self.coefficient_dtype = check_coefficient_setting(setting)
        want = coefficient_storage_dtype(self.weight.dtype, setting)
        if self.coeff.dtype != want:
            with torch.no_grad():
                self.coeff.data = checked_cast(self.coeff.data, want)
        return self

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Gathers run on 2-D (tokens, features) views: CPU index_select along the last dim of a 3-D
        # tensor is ~30x slower than along dim 1 of the same data viewed 2-D (same bytes moved).
        # The ops and their order are those of the layer's first version (the MPIFA pipeline runs this
        # forward on its compressed stream, so its checkpoints stay bit-identical); what is gone is
        # per-call work that computed nothing: dtype promotions and casts to the dtype a tensor already
        # has (1-2 us a layer on a CPU), and an allocation for the bias add. A different op order (the
        # GEMMs writing into one preallocated output instead of the cat, the bias fused into a GEMM)
        # changes results in the last bit: tests/storage/test_forward.py pins both properties.
        x2 = x.reshape(-1, self.in_features)
        if self._form == "row":
            y = self._row_forward(x2)
        else:
            if not self.input_permuted:
                x2 = x2.index_select(1, self.input_index)
            y = F.linear(self._column_coefficients(x2), self.weight, self.bias)
        return y.view(x.shape[:-1] + (self.out_features,))

    def _row_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """(T, in) -> (T, out): z = x W^T, [z, z C^T] gathered to the output order, plus the bias."""
        z = F.linear(x2, self.weight)
        coeff = self.coeff
        if coeff.dtype == z.dtype:
            zc = F.linear(z, coeff)
        else:  # C stored wider than x: the product in the promoted dtype, rounded once
            cd = torch.promote_types(z.dtype, coeff.dtype)
            zc = F.linear(z.to(cd), coeff.to(cd)).to(z.dtype)
        y = torch.cat([z, zc], dim=-1).index_select(1, self.output_index)
        bias = self.bias
        if bias is None:
            return y
        return y.add_(bias) if bias.dtype == y.dtype else y + bias  # y is this call's own tensor

    def _column_coefficients(self, xp: torch.Tensor) -> torch.Tensor:
        """(T, in) in pivot-first order -> z = xp[:, :r] + xp[:, r:] C^T (T, r), one fused addmm."""
        r, coeff = self._rank, self.coeff
        if coeff.dtype == xp.dtype:
            return torch.addmm(xp[:, :r], xp[:, r:], coeff.t())
        cd = torch.promote_types(xp.dtype, coeff.dtype)
        return torch.addmm(xp[:, :r].to(cd), xp[:, r:].to(cd), coeff.to(cd).t()).to(xp.dtype)


def set_coefficient_dtype_(model: nn.Module, setting: str) -> nn.Module:
    """In place: every PIFALinear of ``model`` stores its coefficients as ``setting`` says (see
    PIFALinear; "same" restores the plain all-one-dtype storage). Returns ``model``."""
    check_coefficient_setting(setting)
    for module in model.modules():
        if isinstance(module, PIFALinear):
            module.set_coefficient_dtype_(setting)
    return model


@torch.no_grad()
def emit_in_order_(producers: list[nn.Module], consumer: PIFALinear) -> None:
    """Scatter-free MLP: make every producer (gate/up, whose outputs are combined element-wise into
    the consumer's input) emit channels in the consumer's pivot-first order, and let the consumer
    (column form) read contiguous slices without gathering (``input_permuted=True``).

    producers: nn.Linear, PIFALinear or LowRankLinear with out_features == consumer.in_features.
    """
    if not isinstance(consumer, PIFALinear) or consumer.form != "column":
        raise ValueError(
            "the consumer must be a column-form PIFALinear (it is the one that gathers its input)"
        )
    if consumer.input_permuted:
        raise ValueError("the consumer already reads permuted input: emit_in_order_ was applied twice")
    order = consumer.input_index.long()
    for producer in producers:
        if getattr(producer, "out_features", None) != consumer.in_features:
            raise ValueError(
                f"producer {type(producer).__name__} emits {getattr(producer, 'out_features', '?')} channels, "
                f"the consumer reads {consumer.in_features}"
            )
        if isinstance(producer, CompressedLinear):
            producer.permute_outputs_(order)
        elif isinstance(producer, nn.Linear):
            producer.weight.copy_(producer.weight.index_select(0, order.to(producer.weight.device)))
            if producer.bias is not None:
                producer.bias.copy_(producer.bias.index_select(0, order.to(producer.bias.device)))
        else:
            raise TypeError(f"cannot reorder the outputs of a {type(producer).__name__}")
    consumer.input_permuted = True
