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

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanformers.pifa.factorize import (
    FORMS,
    PIFAFactors,
    normalize_form,
    pifa_from_factors,
    pifa_from_weight,
    pifa_to_dense,
)
from leanformers.pifa.rank import lowrank_num_params, pifa_num_params

__all__ = [
    "AUTO_COEFFICIENT_DTYPE",
    "COEFFICIENT_DTYPES",
    "CompressedLinear",
    "LowRankLinear",
    "PIFALinear",
    "auto_form",
    "coefficient_storage_dtype",
    "emit_in_order_",
    "module_from_spec",
    "set_coefficient_dtype_",
]

SPEC_KEYS = ("kind", "in_features", "out_features", "rank", "bias")

# A one-byte buffer saved with every compressed module. A process that loads the checkpoint without
# `import leanformers` fails on the size mismatch of `weight`; transformers' load report printed with
# that error then lists this key as UNEXPECTED, which names the fix.
LOAD_HINT = "import_leanformers_before_from_pretrained"


# Settings of PIFALinear(coefficient_dtype=...): "auto" (the measured default below), "same" (C in the
# dtype of the other parameters), or a dtype name C is stored in whenever the layer is 16-bit.
COEFFICIENT_DTYPES = ("auto", "same", "float32", "float16", "bfloat16")
# "auto": the storage of C for a layer whose other parameters are in the key's dtype (others: "same").
# bf16 -> fp16: same bytes, 3 more mantissa bits. SmolLM2-135M MPIFA 0.8, bf16 forward: +0.263 % perplexity
# vs fp32 where all-bf16 storage gives +0.543 % (docs/benchmarks.md §13).
AUTO_COEFFICIENT_DTYPE: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.float16}


def _check_coefficient_setting(setting: str) -> str:
    if setting not in COEFFICIENT_DTYPES:
        raise ValueError(f"coefficient_dtype must be one of {COEFFICIENT_DTYPES}, got {setting!r}")
    return setting


def coefficient_storage_dtype(param_dtype: torch.dtype | None, setting: str = "auto") -> torch.dtype:
    """dtype of a PIFA layer's coefficients C when its other parameters are ``param_dtype``
    (None: torch's default dtype). ``setting`` (see COEFFICIENT_DTYPES) applies only to 16-bit layers:
    a float32 / float64 layer always stores C in its own dtype."""
    _check_coefficient_setting(setting)
    param_dtype = param_dtype or torch.get_default_dtype()
    if setting == "same" or not param_dtype.is_floating_point or param_dtype.itemsize > 2:
        return param_dtype
    if setting == "auto":
        return AUTO_COEFFICIENT_DTYPE.get(param_dtype, param_dtype)
    return getattr(torch, setting)


def _register_load_hint(module: nn.Module, device) -> None:
    module.register_buffer(LOAD_HINT, torch.ones(1, dtype=torch.uint8, device=device))


def auto_form(out_features: int, in_features: int) -> str:
    """Form whose one gather touches the smaller side: column (gathers the input) for tall and
    square W (m >= n), row (gathers the output) for wide W (m < n)."""
    return "column" if out_features >= in_features else "row"


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
        _check_spec(spec, cls.kind)
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
        order = _check_perm(order, self.out_features).to(self.weight.device)
        self._permute_output_factor_(order)
        if self.bias is not None:
            self.bias.copy_(self.bias.index_select(0, order))
        return self


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
        self.coefficient_dtype = _check_coefficient_setting(coefficient_dtype)
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
            layer.coeff.copy_(_checked_cast(factors.coeff, layer.coeff.dtype))
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
                    self.coeff.data = _checked_cast(before, want)
                except OverflowError:
                    self.coeff.data = before  # unrounded, so that the fix the error names still applies
                    raise
                if self.coeff.grad is not None:
                    self.coeff.grad = self.coeff.grad.to(want)
        return self

    def set_coefficient_dtype_(self, setting: str) -> PIFALinear:
        """In place: store C as ``setting`` (COEFFICIENT_DTYPES) says from now on (converts C now)."""
        self.coefficient_dtype = _check_coefficient_setting(setting)
        want = coefficient_storage_dtype(self.weight.dtype, setting)
        if self.coeff.dtype != want:
            with torch.no_grad():
                self.coeff.data = _checked_cast(self.coeff.data, want)
        return self

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Gathers run on 2-D (tokens, features) views: CPU index_select along the last dim of a 3-D
        # tensor is ~30x slower than along dim 1 of the same data viewed 2-D (same bytes moved).
        # C stored wider than x (fp16 C in a bf16 layer): its product runs in the promoted dtype and
        # is rounded once to x's dtype (casting C down to x's dtype would undo its storage).
        lead = x.shape[:-1]
        cd = torch.promote_types(x.dtype, self.coeff.dtype)
        if self._form == "row":
            z = F.linear(x.reshape(-1, self.in_features), self.weight)
            zc = F.linear(z.to(cd), self.coeff.to(cd)).to(z.dtype)
            y = torch.cat([z, zc], dim=-1).index_select(1, self.output_index)
            y = y.view(*lead, self.out_features)
            return y if self.bias is None else y + self.bias
        x2 = x.reshape(-1, self.in_features)
        if not self.input_permuted:
            x2 = x2.index_select(1, self.input_index)
        r = self._rank
        z = torch.addmm(x2[:, :r].to(cd), x2[:, r:].to(cd), self.coeff.to(cd).t()).to(x2.dtype)
        return F.linear(z, self.weight, self.bias).view(*lead, self.out_features)


class LowRankLinear(CompressedLinear):
    """y = (x V^T) U^T + b: ``weight_in`` = V (rank, in), ``weight`` = U (out, rank), ``bias`` (out,).

    The low-rank baseline of PIFA (same surface). U is named ``weight`` for the same load guard as
    PIFALinear: its shape differs from the dense (out, in) unless rank == in_features.
    """

    def _create_factors(self, kw: dict) -> None:
        self.weight_in = nn.Parameter(torch.empty(self._rank, self.in_features, **kw))
        self.weight = nn.Parameter(torch.empty(self.out_features, self._rank, **kw))

    def reset_parameters(self) -> None:
        self._uniform_init_(self.weight_in, self.weight)

    @classmethod
    def _from_uv(cls, U, V, bias, *, form: str, dtype) -> LowRankLinear:
        """``form`` is accepted and ignored (one layout)."""
        if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[0]:
            raise ValueError(
                f"expected U (m, r) and V (r, n) with the same r, got U {tuple(U.shape)} and V {tuple(V.shape)}"
            )
        dtype = dtype or U.dtype
        layer = cls(V.shape[1], U.shape[0], U.shape[1], bias=bias is not None, dtype=dtype, device=U.device)
        with torch.no_grad():
            layer.weight.copy_(U)
            layer.weight_in.copy_(V)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    kind = "lowrank"

    @property
    def form(self) -> str:
        return "lowrank"

    @property
    def num_parameters(self) -> int:
        """Stored weight count r (m + n) (bias not counted)."""
        return lowrank_num_params(self.out_features, self.in_features, self._rank)

    def dense_weight(self) -> torch.Tensor:
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        return (self.weight.detach().to(acc) @ self.weight_in.detach().to(acc)).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_in), self.weight, self.bias)


def _checked_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; a finite value that overflows it (|C| > 65504 in float16) is an error, not an inf."""
    out = t.to(dtype)
    real = out.device.type != "meta" and dtype.is_floating_point and out.numel() > 0
    if real and not bool(torch.isfinite(out).all()) and bool(torch.isfinite(t).all()):
        raise OverflowError(
            f"PIFA coefficients up to |C| = {t.abs().max().item():.4g} overflow {dtype}: store them in "
            "float32 (coefficient_dtype='float32') or as the layer's dtype (coefficient_dtype='same')"
        )
    return out


def _check_spec(spec: dict, kind: str) -> None:
    if not isinstance(spec, dict):
        raise TypeError(f"a module spec must be a dict, got {type(spec).__name__}")
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"module spec {spec} lacks {missing}: build specs with layer.spec()")
    if spec["kind"] != kind:
        raise ValueError(f"spec kind {spec['kind']!r} cannot build a {kind!r} layer")


def _check_perm(order: torch.Tensor, size: int) -> torch.Tensor:
    order = torch.as_tensor(order).long()
    if order.shape != (size,) or not torch.equal(torch.sort(order.cpu()).values, torch.arange(size)):
        raise ValueError(f"order must be a permutation of range({size}), got shape {tuple(order.shape)}")
    return order


def module_from_spec(
    spec: dict, dtype: torch.dtype | None = None, device=None, coefficient_dtype: str = "auto"
) -> nn.Module:
    """Empty PIFALinear / LowRankLinear (parameters uninitialised on meta) from ``layer.spec()``;
    ``coefficient_dtype``: the C storage of a PIFA layer (see PIFALinear)."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"module spec must be a dict with a 'kind' key, got {spec!r}")
    builders = {"pifa": PIFALinear, "lowrank": LowRankLinear}
    if spec["kind"] not in builders:
        raise ValueError(f"unknown module kind {spec['kind']!r}: expected one of {sorted(builders)}")
    options = {"coefficient_dtype": coefficient_dtype} if spec["kind"] == "pifa" else {}
    return builders[spec["kind"]].from_spec(spec, dtype=dtype, device=device, **options)


def set_coefficient_dtype_(model: nn.Module, setting: str) -> nn.Module:
    """In place: every PIFALinear of ``model`` stores its coefficients as ``setting`` says (see
    PIFALinear; "same" restores the plain all-one-dtype storage). Returns ``model``."""
    _check_coefficient_setting(setting)
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
