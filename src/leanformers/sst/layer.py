"""The SST tuner layer's state and the schedule's operations on it (the forward lives in ``linear.py``).

State per adapter (all saved by ``save_pretrained``, all persistent):

- ``sst_U`` (m, k) and ``sst_Vh`` (k, n): frozen buffers (the ``idx`` slots are stale while active),
- ``sst_S`` (k,): trainable parameter,
- ``sst_U_active`` (m, r) and ``sst_Vh_active`` (r, n): the trainable active vectors, swapped in and
  out IN PLACE so that the optimizer keeps holding the same Parameter objects,
- ``sst_index`` (r,): the active indices; ``sst_counters``: [iteration, round, iterations_per_round];
- ``sst_touched`` (k,) uint8: 1 where U / Vh differ from the SVD of the base weight (written back at
  least once, or everything after a re-SVD): what a compact adapter stores besides S.

The base layer's dense weight is freed after the SVD (replaced by an empty tensor); its bias stays
on the base layer, is trained in pretraining mode and is saved with the adapter.
"""

from __future__ import annotations

import math

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from leanformers._compat import is_conv1d
from leanformers.sst.sampling import sample_indices
from leanformers.sst.spectral import effective_weight, orthogonality_error, thin_svd
from leanformers.training.distributed import broadcast_, seeded_generator
from leanformers.training.fsdp import gather_full, gathered, is_dtensor

__all__ = ["SSTLayer", "TrainingWatch", "find_sst_layers"]


class TrainingWatch:
    """State shared by all SST layers of one model: is a controller attached, was the user warned, does a
    Trainer run write checkpoints (full adapter state) right now."""

    def __init__(self) -> None:
        self.controlled = False
        self.sentinel: int | None = None  # id() of the one layer that compares its S between forwards
        self.warned_no_controller = False
        self.warned_merged_training = False
        self.warned_inexact_reload = False
        self.trainer_checkpoints = False  # set by SSTCallback between on_train_begin and on_train_end


class SSTLayer(BaseTunerLayer):
    """Bookkeeping shared by SST layers (PEFT's per-adapter containers) and the schedule's factor operations."""

    adapter_layer_names = ("sst_S", "sst_U_active", "sst_Vh_active")
    other_param_names = ("sst_U", "sst_Vh", "sst_index", "sst_counters", "sst_touched")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.sst_S = nn.ParameterDict({})
        self.sst_U_active = nn.ParameterDict({})
        self.sst_Vh_active = nn.ParameterDict({})
        # persistent=True: PEFT's BufferDict default drops buffers from the state dict (and the checkpoint).
        self.sst_U = BufferDict({}, persistent=True)
        self.sst_Vh = BufferDict({}, persistent=True)
        self.sst_index = BufferDict({}, persistent=True)
        self.sst_counters = BufferDict({}, persistent=True)
        self.sst_touched = BufferDict({}, persistent=True)
        self.sst_settings: dict[str, dict] = {}
        # The containers' own dicts (never replaced; .to() and load_state_dict update them in place): item
        # access through ParameterDict / Module.__getattr__ costs more than a decoding step's small matmul.
        self.sst_dicts = (
            self.sst_U._buffers,
            self.sst_S._parameters,
            self.sst_Vh._buffers,
            self.sst_index._buffers,
            self.sst_U_active._parameters,
            self.sst_Vh_active._parameters,
        )
        # adapters whose factors still await a state dict (or, ``pending_svd``, the SSTModel's batched SVD)
        self.sst_unloaded: set[str] = set()
        self.pending_svd: set[str] = set()
        self._disable_adapters = False
        self.merged_adapters = []
        self.sst_watch = TrainingWatch()  # replaced by the SSTModel's shared one
        self.last_orthogonality_errors: tuple[float, float] | None = None  # (before, after) the last re-SVD
        self.kwargs = kwargs
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
            self.is_conv1d = False
        elif is_conv1d(base):
            self.in_features, self.out_features = base.weight.shape[0], base.nf
            self.is_conv1d = True
        else:
            raise TypeError(
                f"SST supports torch.nn.Linear and transformers Conv1D layers, got {type(base).__name__}; "
                "exclude this module with SSTConfig(exclude_modules=...)"
            )
        self.base_dtype = base.weight.dtype

    # ----------------------------------------------------------------------------------- set-up
    def update_layer(
        self, adapter_name: str, r: int, config, layer_key: str, defer_svd: bool = False
    ) -> None:
        """Create the factors of ``adapter_name``.

        The SVD of the base weight is taken here, or (``defer_svd``) left to :meth:`set_factors_` so that the
        SSTModel factorises all layers together (:func:`leanformers.sst.spectral.thin_svds`). Without
        ``init_weights`` the factors are only allocated: a state dict must fill them; a compact adapter
        (``saved_format="compact"``) keeps the base weight until its load has recomputed its SVD.
        """
        m, n = self.out_features, self.in_features
        k = min(m, n)
        if r > k:
            raise ValueError(
                f"SST rank r={r} is larger than min(out, in) = {k} of layer {layer_key!r} ({m}x{n}); "
                f"lower SSTConfig.r or set SSTConfig(rank_pattern={{{layer_key.rsplit('.', 1)[-1]!r}: {k}}})"
            )
        if adapter_name in self.sst_S:
            raise ValueError(f"layer {layer_key!r} already holds an SST adapter called {adapter_name!r}")
        weight = self.get_base_layer().weight
        device = weight.device
        ipr = config.iterations_per_round or math.ceil(k / r)
        self.sst_settings[adapter_name] = {
            "r": r,
            "k": k,
            "iterations_per_round": ipr,
            "steps_per_iteration": config.steps_per_iteration,
            "warmup_steps_per_iteration": config.warmup_steps_per_iteration,
            "sampling": config.sampling,
            "magnitude_mix": float(config.magnitude_mix),
            "enhanced_gradient": bool(config.enhanced_gradient),
            "seed": int(config.seed),
            "key": layer_key,
        }
        compute = config.init_weights and device.type != "meta" and weight.numel() == m * n
        frozen_dtype = getattr(torch, getattr(config, "frozen_factor_dtype", "float32"))
        # Shapes only, no SVD yet (reload, meta device, or the batched SVD of the SSTModel).
        self.sst_U[adapter_name] = torch.empty(m, k, device=device, dtype=frozen_dtype)
        self.sst_Vh[adapter_name] = torch.empty(k, n, device=device, dtype=frozen_dtype)
        self.sst_index[adapter_name] = torch.arange(r, device=device)
        self.sst_counters[adapter_name] = torch.tensor([0, 0, ipr], dtype=torch.long, device=device)
        self.sst_touched[adapter_name] = torch.zeros(k, dtype=torch.uint8, device=device)
        self.sst_S[adapter_name] = nn.Parameter(torch.zeros(k, device=device, dtype=torch.float32))
        self.sst_U_active[adapter_name] = nn.Parameter(torch.empty(m, r, device=device, dtype=torch.float32))
        self.sst_Vh_active[adapter_name] = nn.Parameter(torch.empty(r, n, device=device, dtype=torch.float32))
        if compute and defer_svd:
            self.pending_svd.add(adapter_name)
        elif compute:
            self.set_factors_(adapter_name, *thin_svd(self.dense_base_weight()))
        else:
            self.sst_unloaded.add(adapter_name)
            if getattr(config, "saved_format", None) != "compact":
                self.free_base_weight()
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def dense_base_weight(self) -> torch.Tensor:
        """The base layer's weight as (out, in) (transposed for Conv1D); it must still be there."""
        weight = self.get_base_layer().weight
        if weight.device.type == "meta" or weight.numel() != self.out_features * self.in_features:
            raise RuntimeError(
                f"the base weight of this {self.out_features}x{self.in_features} layer is gone (freed by SST, or on "
                "the meta device): SST needs the base model's weights here; load the base model with its weights "
                "(from_pretrained) and wrap it again"
            )
        return weight.t() if self.is_conv1d else weight

    @torch.no_grad()
    def set_factors_(self, adapter: str, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> None:
        """Start from the SVD U diag(S) Vh of the base weight: draw the first indices, free the base weight."""
        self.sst_U[adapter].copy_(U)
        self.sst_Vh[adapter].copy_(Vh)
        self.sst_S[adapter].copy_(S)
        idx = self._draw(adapter, S, iteration=0).to(self.sst_index[adapter].device)
        self.sst_index[adapter].copy_(idx)
        self.sst_U_active[adapter].copy_(U[:, idx])
        self.sst_Vh_active[adapter].copy_(Vh[idx])
        self.pending_svd.discard(adapter)
        self.sst_unloaded.discard(adapter)
        self.free_base_weight()

    def free_base_weight(self) -> None:
        """Drop the dense weight (keeping dtype/device); otherwise SST would cost more memory than dense."""
        base = self.get_base_layer()
        w = base.weight
        if w.numel() == 0:
            return
        base.weight = nn.Parameter(torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False)

    def _draw(self, adapter_name: str, S: torch.Tensor, iteration: int) -> torch.Tensor:
        s = self.sst_settings[adapter_name]
        iterations_per_round = s["iterations_per_round"]
        # Same generator on every rank and in a resumed run: seed, layer name and iteration only.
        gen = seeded_generator(s["seed"], s["key"], int(iteration))
        return sample_indices(
            S,
            s["r"],
            s["sampling"],
            magnitude_mix=s["magnitude_mix"],
            iteration=int(iteration) % iterations_per_round,
            generator=gen,
        )

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # Device only: the factors stay float32 whatever the base dtype (orthogonality needs it).
        target = device if device is not None else self.get_base_layer().weight.device
        if target.type == "meta":
            return
        for name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, name)
            if adapter_name in container and container[adapter_name].device != target:
                item = container[adapter_name]
                if isinstance(item, nn.Parameter):
                    container[adapter_name] = nn.Parameter(
                        item.data.to(target), requires_grad=item.requires_grad
                    )
                else:
                    container[adapter_name] = item.to(target)

    # ----------------------------------------------------------------------------------- maths glue
    def factors(self, adapter: str) -> tuple[torch.Tensor, ...]:
        """(U, S, Vh, idx, U_active, Vh_active) of ``adapter`` as held (FSDP2 shards stay shards)."""
        return (
            self.sst_U[adapter],
            self.sst_S[adapter],
            self.sst_Vh[adapter],
            self.sst_index[adapter],
            self.sst_U_active[adapter],
            self.sst_Vh_active[adapter],
        )

    @torch.no_grad()
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The effective weight U_eff diag(S) Vh_eff (out, in), float32. SST replaces W, it adds no delta.

        Under FSDP2 the sharded factors are gathered first (a collective: call it on every rank).
        """
        U, S, Vh, idx, Ua, Vha = (gather_full(t) for t in self.factors(adapter))
        return effective_weight(U, S, Vh, idx, Ua, Vha)

    def effective_weight(self, adapter: str | None = None) -> torch.Tensor:
        """(out, in) float32 weight the layer computes with (no grad)."""
        return self.get_delta_weight(adapter or self.active_adapters[0])

    @property
    def sst_sharded(self) -> bool:
        """True when the trainable factors are FSDP2 shards (``DTensor``) outside forward/backward."""
        adapter = self.active_adapters[0] if self.active_adapters else None
        return adapter in self.sst_S and is_dtensor(self.sst_S[adapter])

    # Under FSDP2 the factor operations below gather each whole factor (gather_full), compute on it exactly as
    # in one process (the same bits on every rank) and write every rank's shard back (write_full_). U and Vh
    # are FSDP2 shards too once held as frozen parameters (frozen_factors_as_parameters_); the indices,
    # counters and touched flags stay buffers, which FSDP2 leaves whole and replicated.
    @torch.no_grad()
    def post_step_(self, adapter: str) -> None:
        """After an optimizer step: S >= 0 and unit-norm active vectors (magnitude lives in S only)."""
        # Under FSDP2 these run on the DTensor shards, nothing gathered: the clamp is elementwise, and DTensor
        # reduces the column norms of U_active across ranks (r numbers) and keeps row norms of Vh_active local.
        self.sst_S[adapter].clamp_(min=0)
        Ua, Vha = self.sst_U_active[adapter], self.sst_Vh_active[adapter]
        Ua.div_(Ua.norm(dim=0, keepdim=True).clamp_min(1e-12))
        Vha.div_(Vha.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def _gathered_factors(self, adapter: str):
        """Context: whole (U, S, Vh, U_active, Vh_active), written back into the shards on exit."""
        return gathered(
            self.sst_U[adapter],
            self.sst_S[adapter],
            self.sst_Vh[adapter],
            self.sst_U_active[adapter],
            self.sst_Vh_active[adapter],
        )

    def _write_back(self, adapter: str, U, Vh, Ua, Vha) -> None:
        idx = self.sst_index[adapter]
        U.index_copy_(1, idx, Ua.to(U.dtype))
        Vh.index_copy_(0, idx, Vha.to(Vh.dtype))
        self.sst_touched[adapter].index_fill_(0, idx, 1)

    def _resvd(self, adapter: str, U, S, Vh) -> None:
        U_new, S_new, Vh_new = thin_svd(U.float() @ (S.detach().float()[:, None] * Vh.float()))
        U.copy_(U_new)
        S.copy_(S_new)
        Vh.copy_(Vh_new)
        for t in (U, S, Vh):  # rank 0's result everywhere: bit-identical factors whatever the LAPACK build
            broadcast_(t)
        self.sst_touched[adapter].fill_(1)  # nothing derives from the base weight's SVD any more

    @torch.no_grad()
    def write_back_(self, adapter: str) -> None:
        """Copy the active vectors into their slots of U and Vh."""
        with self._gathered_factors(adapter) as (U, _, Vh, Ua, Vha):
            self._write_back(adapter, U, Vh, Ua, Vha)

    @torch.no_grad()
    def resvd_(self, adapter: str) -> float:
        """U, S, Vh <- svd(U diag(S) Vh) in float32 (active vectors written back first).

        Restores orthogonality and re-sorts S; rank 0's result is broadcast so that every rank holds
        bit-identical factors. Returns the orthogonality error before the re-SVD.
        """
        with self._gathered_factors(adapter) as (U, S, Vh, Ua, Vha):
            self._write_back(adapter, U, Vh, Ua, Vha)
            error = orthogonality_error(U, Vh)
            self._resvd(adapter, U, S, Vh)
        self.factors_changed()
        return error

    @torch.no_grad()
    def start_iteration_(self, adapter: str) -> bool:
        """Begin the next iteration: write back, re-SVD at a round boundary, draw new active indices and
        copy their vectors into the active parameters in place. Returns True when a round ended.

        After a round end, ``last_orthogonality_errors`` holds the errors (before, after) the re-SVD.
        """
        counters = self.sst_counters[adapter]
        iteration = int(counters[0]) + 1
        round_end = iteration % int(counters[2]) == 0
        idx = self.sst_index[adapter]
        with self._gathered_factors(adapter) as (U, S, Vh, Ua, Vha):  # one gather per factor, one write
            self._write_back(adapter, U, Vh, Ua, Vha)
            if round_end:
                before = orthogonality_error(U, Vh)
                self._resvd(adapter, U, S, Vh)
                self.last_orthogonality_errors = (before, orthogonality_error(U, Vh))
                counters[1] += 1
            new_idx = self._draw(adapter, S, iteration).to(idx.device)
            idx.copy_(new_idx)
            Ua.copy_(U[:, new_idx])
            Vha.copy_(Vh[new_idx])
        counters[0] = iteration
        self.factors_changed()
        return round_end

    def factors_changed(self) -> None:
        """Hook: the factors were rewritten in place (SSTLinear drops its cached weights)."""

    def frozen_factors_as_parameters_(self) -> None:
        """Hold the frozen U and Vh as parameters with ``requires_grad=False`` instead of buffers.

        FSDP2 shards parameters only: as buffers, U and Vh (k(m + n) numbers per layer, about 1.4x the dense
        weight) would stay whole on every rank. As frozen parameters they are sharded like the trainable
        factors, gathered for the forward of their FSDP unit and freed after it, and no optimizer sees them
        (the Trainer and the usual ``[p for p in model.parameters() if p.requires_grad]`` skip them). State
        dict keys do not change. Call before ``fully_shard`` (``SSTCallback`` does it when the Trainer is set
        up for FSDP2). The inference cache is switched off (it would hold a dense copy of every layer on every
        rank). Idempotent.
        """
        for name in ("sst_U", "sst_Vh"):
            container = getattr(self, name)
            if isinstance(container, nn.ParameterDict):
                continue
            setattr(
                self,
                name,
                nn.ParameterDict({k: nn.Parameter(v, requires_grad=False) for k, v in container.items()}),
            )
        self.sst_dicts = (
            self.sst_U._parameters,
            *self.sst_dicts[1:2],
            self.sst_Vh._parameters,
            *self.sst_dicts[3:],
        )
        self.inference_cache = False  # a dense (out, in) copy per layer on every rank would undo the sharding
        self.factors_changed()


def find_sst_layers(model: nn.Module, required: bool = False) -> dict[str, SSTLayer]:
    """``{module name: SST layer}`` of ``model`` (wrappers such as DDP included in the names).

    Args:
        required: raise a ``ValueError`` naming the fix when the model holds no SST layer.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SSTLayer)}
    if required and not layers:
        raise ValueError(
            "the model holds no SST layer: wrap it with peft.get_peft_model(model, leanformers.SSTConfig(...)) "
            "first and pass the PeftModel it returns"
        )
    return layers
