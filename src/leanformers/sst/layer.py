"""The SST tuner layer: a linear (or GPT-2 Conv1D) layer held as its full-rank SVD.

State per adapter (all saved by ``save_pretrained``, all persistent):

- ``sst_U`` (m, k) and ``sst_Vh`` (k, n): frozen buffers (the ``idx`` slots are stale while active),
- ``sst_S`` (k,): trainable parameter,
- ``sst_U_active`` (m, r) and ``sst_Vh_active`` (r, n): the trainable active vectors, swapped in and
  out IN PLACE so that the optimizer keeps holding the same Parameter objects,
- ``sst_index`` (r,): the active indices; ``sst_counters``: [iteration, round, iterations_per_round].

The base layer's dense weight is freed after the SVD (replaced by an empty tensor); its bias stays
on the base layer, is trained in pretraining mode and is saved with the adapter.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from leanformers._compat import is_conv1d
from leanformers.sst.spectral import (
    effective_weight,
    inference_weight,
    linear_with_weight,
    orthogonality_error,
    sample_indices,
    spectral_linear,
    thin_svd,
)
from leanformers.training.distributed import broadcast_, seeded_generator
from leanformers.training.fsdp import gather_full, gathered, is_dtensor

__all__ = ["SSTLayer", "SSTLinear", "TrainingWatch", "find_sst_layers"]

NO_CONTROLLER_MESSAGE = (
    "SST layers are being trained (their singular values S changed between two training forwards) but no "
    "SSTController / SSTCallback drives the SST schedule: the active singular vectors are never re-sampled, "
    "S is not clamped, the vectors are not renormalised and no re-SVD happens, so only {r} fixed directions "
    "per layer ever train. Fix: Trainer(..., callbacks=[leanformers.SSTCallback()]), or in a custom loop "
    "create controller = leanformers.SSTController(model) and call controller.step(optimizer) after every "
    "optimizer.step()."
)


class TrainingWatch:
    """State shared by all SST layers of one model: is a controller attached, was the user warned."""

    def __init__(self) -> None:
        self.controlled = False
        self.sentinel: int | None = None  # id() of the one layer that compares its S between forwards
        self.warned_no_controller = False
        self.warned_merged_training = False


class SSTLayer(BaseTunerLayer):
    """Bookkeeping shared by SST layers (PEFT's per-adapter containers)."""

    adapter_layer_names = ("sst_S", "sst_U_active", "sst_Vh_active")
    other_param_names = ("sst_U", "sst_Vh", "sst_index", "sst_counters")

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
        self.sst_settings: dict[str, dict] = {}
        # The containers' own dicts (never replaced; .to() and load_state_dict update them in place): item
        # access through ParameterDict / Module.__getattr__ costs more than a decoding step's small matmul.
        self._sst_dicts = (
            self.sst_U._buffers,
            self.sst_S._parameters,
            self.sst_Vh._buffers,
            self.sst_index._buffers,
            self.sst_U_active._parameters,
            self.sst_Vh_active._parameters,
        )
        self._sst_unloaded: set[str] = set()  # adapters whose factors still await a state dict
        self._disable_adapters = False
        self.merged_adapters = []
        self._sst_watch = TrainingWatch()  # replaced by the SSTModel's shared one
        self._sst_seen_S: torch.Tensor | None = None  # S at the last training forward (one layer per model)
        self._sst_cache: tuple[tuple, torch.Tensor] | None = None
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
    def update_layer(self, adapter_name: str, r: int, config, layer_key: str) -> None:
        """Create the factors of ``adapter_name`` (SVD of the base weight unless it must be loaded)."""
        m, n = self.out_features, self.in_features
        k = min(m, n)
        if r > k:
            raise ValueError(
                f"SST rank r={r} is larger than min(out, in) = {k} of layer {layer_key!r} ({m}x{n}); "
                f"lower SSTConfig.r or set SSTConfig(rank_pattern={{{layer_key.rsplit('.', 1)[-1]!r}: {k}}})"
            )
        if adapter_name in self.sst_S:
            raise ValueError(f"layer {layer_key!r} already holds an SST adapter called {adapter_name!r}")
        base = self.get_base_layer()
        weight = base.weight
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
        if compute:
            dense = weight.t() if self.is_conv1d else weight  # (out, in)
            U, S, Vh = thin_svd(dense)
            idx = self._draw(adapter_name, S, iteration=0)
        else:
            # Reload path (or meta device): shapes only, no SVD; a state dict must fill them.
            U = torch.empty(m, k, device=device, dtype=torch.float32)
            S = torch.zeros(k, device=device, dtype=torch.float32)
            Vh = torch.empty(k, n, device=device, dtype=torch.float32)
            idx = torch.arange(r, device=device)
            self._sst_unloaded.add(adapter_name)
        frozen_dtype = getattr(torch, getattr(config, "frozen_factor_dtype", "float32"))
        self.sst_U[adapter_name] = U.to(frozen_dtype)
        self.sst_Vh[adapter_name] = Vh.to(frozen_dtype)
        self.sst_index[adapter_name] = idx
        self.sst_counters[adapter_name] = torch.tensor([0, 0, ipr], dtype=torch.long, device=device)
        self.sst_S[adapter_name] = nn.Parameter(S)
        self.sst_U_active[adapter_name] = nn.Parameter(U[:, idx].clone())
        self.sst_Vh_active[adapter_name] = nn.Parameter(Vh[idx].clone())
        self._free_base_weight()
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _free_base_weight(self) -> None:
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
    def _factors(self, adapter: str):
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
        U, S, Vh, idx, Ua, Vha = (gather_full(t) for t in self._factors(adapter))
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
    # are FSDP2 shards too once held as frozen parameters (frozen_factors_as_parameters_); the indices and
    # counters stay buffers, which FSDP2 leaves whole and replicated.
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

    @staticmethod
    def _write_back(U, Vh, idx, Ua, Vha) -> None:
        U.index_copy_(1, idx, Ua.to(U.dtype))
        Vh.index_copy_(0, idx, Vha.to(Vh.dtype))

    @staticmethod
    def _resvd(U, S, Vh) -> None:
        U_new, S_new, Vh_new = thin_svd(U.float() @ (S.detach().float()[:, None] * Vh.float()))
        U.copy_(U_new)
        S.copy_(S_new)
        Vh.copy_(Vh_new)
        for t in (U, S, Vh):  # rank 0's result everywhere: bit-identical factors whatever the LAPACK build
            broadcast_(t)

    @torch.no_grad()
    def write_back_(self, adapter: str) -> None:
        """Copy the active vectors into their slots of U and Vh."""
        with self._gathered_factors(adapter) as (U, _, Vh, Ua, Vha):
            self._write_back(U, Vh, self.sst_index[adapter], Ua, Vha)

    @torch.no_grad()
    def resvd_(self, adapter: str) -> float:
        """U, S, Vh <- svd(U diag(S) Vh) in float32 (active vectors written back first).

        Restores orthogonality and re-sorts S; rank 0's result is broadcast so that every rank holds
        bit-identical factors. Returns the orthogonality error before the re-SVD.
        """
        with self._gathered_factors(adapter) as (U, S, Vh, Ua, Vha):
            self._write_back(U, Vh, self.sst_index[adapter], Ua, Vha)
            error = orthogonality_error(U, Vh)
            self._resvd(U, S, Vh)
        self._sst_cache = None
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
            self._write_back(U, Vh, idx, Ua, Vha)
            if round_end:
                before = orthogonality_error(U, Vh)
                self._resvd(U, S, Vh)
                self.last_orthogonality_errors = (before, orthogonality_error(U, Vh))
                counters[1] += 1
            new_idx = self._draw(adapter, S, iteration).to(idx.device)
            idx.copy_(new_idx)
            Ua.copy_(U[:, new_idx])
            Vha.copy_(Vh[new_idx])
        counters[0] = iteration
        self._sst_cache = None
        return round_end

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
        self._sst_dicts = (
            self.sst_U._parameters,
            *self._sst_dicts[1:2],
            self.sst_Vh._parameters,
            *self._sst_dicts[3:],
        )
        self.inference_cache = False  # a dense (out, in) copy per layer on every rank would undo the sharding
        self._sst_cache = None


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


class SSTLinear(nn.Module, SSTLayer):
    """SST replacement of an ``nn.Linear`` or GPT-2 ``Conv1D``: y = U_eff diag(S) Vh_eff x + b.

    Without gradients for the factors (``torch.no_grad()``, eval, generation, a frozen reloaded adapter) the
    dense weight U_eff diag(S) Vh_eff is built once and cached until a factor changes (checked by tensor
    version counter and storage pointer: optimizer steps, re-sampling, re-SVD, ``load_state_dict`` and
    ``.to()`` all invalidate it); a forward with gradients drops it. Set ``inference_cache = False`` on a
    layer to trade speed for memory (the cache holds one dense (out, in) weight per layer).
    """

    inference_cache: bool = True

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, r: int, config, layer_key: str, **kwargs
    ) -> None:
        super().__init__()
        SSTLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, config, layer_key)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        # Factors created without an SVD become usable once a state dict provides all of them.
        for adapter in list(self._sst_unloaded):
            names = ("sst_U", "sst_Vh", "sst_S", "sst_U_active", "sst_Vh_active", "sst_index")
            if all(f"{prefix}{name}.{adapter}" in state_dict for name in names):
                self._sst_unloaded.discard(adapter)
        self._sst_seen_S = None  # a load is not a training step
        self._sst_cache = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write U_eff diag(S) Vh_eff into the base layer's weight (transposed for Conv1D)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if len(adapter_names) > 1:
            raise ValueError(f"SST replaces the weight: merge one adapter at a time, got {adapter_names}")
        adapter = adapter_names[0]
        self._check_loaded(adapter)
        weight = self.get_delta_weight(adapter)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs or infs in the SST weight of adapter {adapter!r}; not merging")
        if self.is_conv1d:
            weight = weight.t()
        base = self.get_base_layer()
        base.weight = nn.Parameter(weight.to(self.base_dtype).contiguous(), requires_grad=False)
        self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Drop the merged dense copy again (the factors are unchanged, so nothing is lost).

        The ORIGINAL pre-SST weight cannot be restored: SST replaced it by its factors and freed it.
        """
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.merged_adapters = []
        self._free_base_weight()

    def _check_loaded(self, adapter: str) -> None:
        if adapter in self._sst_unloaded:
            raise RuntimeError(
                f"the SST factors of adapter {adapter!r} were allocated without an SVD (init_weights=False, as in a "
                "saved adapter_config.json) and have not been loaded: use PeftModel.from_pretrained(model, folder) "
                "or set init_weights=True to start from the base weights"
            )

    def _active_sst_adapter(self) -> str:
        active = self._active_adapter
        if isinstance(active, list) and len(active) == 1:
            active = active[0]
        if isinstance(active, str) and active in self._sst_dicts[1]:  # the common case, fast
            return active
        active = [a for a in self.active_adapters if a in self.sst_S]
        if not active:
            raise RuntimeError(
                f"no active SST adapter in this layer (active: {list(self.active_adapters)}, available: "
                f"{list(self.sst_S.keys())}); the SST adapter holds this layer's weight: call "
                f"set_adapter({next(iter(self.sst_S.keys()), 'default')!r}) or reload the adapter with "
                "PeftModel.from_pretrained"
            )
        return active[0]

    def _watch_training(self, adapter: str, S: torch.Tensor) -> None:
        """Warn once per model when S changes between training forwards with no controller attached.

        Values are compared, not version counters: fused optimizers (``AdamW(fused=True)``, the Trainer's
        default on recent transformers) update parameters without bumping them. One layer per model (the
        first to train) keeps a copy of its S (k numbers); once a controller is attached nothing is checked.
        """
        watch = self._sst_watch
        if watch.controlled or watch.warned_no_controller:
            return
        if watch.sentinel is None:
            watch.sentinel = id(self)
        if watch.sentinel != id(self):
            return
        seen = self._sst_seen_S
        if seen is not None and (seen.shape != S.shape or not torch.equal(seen, S.detach())):
            watch.warned_no_controller = True
            self._sst_seen_S = None
            warnings.warn(
                NO_CONTROLLER_MESSAGE.format(r=self.sst_settings[adapter]["r"]), UserWarning, stacklevel=3
            )
            return
        self._sst_seen_S = S.detach().clone()

    def _cached_weight(self, U, S, Vh, idx, Ua, Vha, x: torch.Tensor) -> torch.Tensor:
        """The inference weight, rebuilt only when a factor changed (in place: version; replaced: pointer)."""
        device_type = x.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        key = (
            U.data_ptr(), U._version, S.data_ptr(), S._version, Vh.data_ptr(), Vh._version,
            idx.data_ptr(), idx._version, Ua.data_ptr(), Ua._version, Vha.data_ptr(), Vha._version,
            x.dtype, x.device, autocast,
        )  # fmt: skip
        if self._sst_cache is not None and self._sst_cache[0] == key:
            return self._sst_cache[1]
        weight = inference_weight(U, S, Vh, idx, Ua, Vha, x)
        self._sst_cache = (key, weight)
        return weight

    def clear_inference_cache(self) -> None:
        """Free the cached inference weight (it is rebuilt on the next no-gradient forward)."""
        self._sst_cache = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._disable_adapters:
            raise RuntimeError(
                "SST adapters cannot be disabled: SST replaced the base weight by its SVD factors and freed it, "
                "so there is no original layer to fall back to"
            )
        adapter = self._active_sst_adapter()
        if self.merged_adapters:
            if self.training and torch.is_grad_enabled() and not self._sst_watch.warned_merged_training:
                self._sst_watch.warned_merged_training = True
                warnings.warn(
                    "the SST adapter is merged: the forward uses the merged dense copy, so the SST factors would not "
                    "train; call unmerge_adapter() before training (or merge_and_unload() for inference only)",
                    UserWarning,
                    stacklevel=2,
                )
            return self.base_layer(x, *args, **kwargs)
        if self._sst_unloaded:
            self._check_loaded(adapter)
        # Direct container access: this runs for every layer and every decoded token (ParameterDict and
        # BufferDict item access go through Module.__getattr__ and cost more than a small matmul).
        U, S, Vh, idx, Ua, Vha = (d[adapter] for d in self._sst_dicts)
        bias = self.base_layer.bias  # SST layers never nest (one adapter per model)
        if torch.is_grad_enabled() and (S.requires_grad or Ua.requires_grad or Vha.requires_grad):
            self._sst_cache = None  # the factors are about to change: free the inference copy
            if self.training:
                self._watch_training(adapter, S)
            return spectral_linear(
                x, S, Ua, Vha, bias, U, Vh, idx, enhanced=self.sst_settings[adapter]["enhanced_gradient"]
            )
        if self.inference_cache:
            weight = self._cached_weight(U, S, Vh, idx, Ua, Vha, x)
        else:
            weight = inference_weight(U, S, Vh, idx, Ua, Vha, x)
        # Frozen factors: y = x W^T + b with a constant W; x and the bias still get gradients if they need them.
        return linear_with_weight(x, weight, bias)

    def __repr__(self) -> str:
        return "sst." + super().__repr__()

    def extra_repr(self) -> str:
        s = self.sst_settings.get(self.active_adapters[0], {}) if self.active_adapters else {}
        return f"in_features={self.in_features}, out_features={self.out_features}, r={s.get('r')}, k={s.get('k')}"
