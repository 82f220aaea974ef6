"""``SSTLinear``: the SST replacement of an ``nn.Linear`` / GPT-2 ``Conv1D`` (forward, caches, merge, load)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from leanformers.sst.layer import SSTLayer
from leanformers.sst.spectral import inference_weight, linear_with_weight, spectral_linear

__all__ = ["DENSE_WEIGHT_KEY", "NO_CONTROLLER_MESSAGE", "SSTLinear"]

# State-dict key (per adapter) of a layer a compact adapter stored as its effective weight; consumed on load.
DENSE_WEIGHT_KEY = "sst_weight"

NO_CONTROLLER_MESSAGE = (
    "SST layers are being trained (their singular values S changed between two training forwards) but no "
    "SSTController / SSTCallback drives the SST schedule: the active singular vectors are never re-sampled, "
    "S is not clamped, the vectors are not renormalised and no re-SVD happens, so only {r} fixed directions "
    "per layer ever train. Fix: Trainer(..., callbacks=[leanformers.SSTCallback()]), or in a custom loop "
    "create controller = leanformers.SSTController(model) and call controller.step(optimizer) after every "
    "optimizer.step()."
)
_FACTOR_NAMES = ("sst_U", "sst_Vh", "sst_S", "sst_U_active", "sst_Vh_active", "sst_index")


def _version_key(tensors, x: torch.Tensor | None = None) -> tuple:
    """Identity of the factors' current values (storage pointer + in-place version) and of x's dtype/device."""
    key = tuple(item for t in tensors for item in (t.data_ptr(), t._version))
    if x is None:
        return key
    device_type = x.device.type
    autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    return (*key, x.dtype, x.device, autocast)


class SSTLinear(nn.Module, SSTLayer):
    """SST replacement of an ``nn.Linear`` or GPT-2 ``Conv1D``: y = U_eff diag(S) Vh_eff x + b.

    Training forwards pick, per call, the cheaper of the factored product and the materialised weight
    (``spectral_path``; see :func:`leanformers.sst.spectral.spectral_linear`). Without gradients for the
    factors (``torch.no_grad()``, eval, generation, a frozen reloaded adapter) the dense weight
    U_eff diag(S) Vh_eff is built once and cached until a factor changes (checked by tensor version counter
    and storage pointer: optimizer steps, re-sampling, re-SVD, ``load_state_dict`` and ``.to()`` all
    invalidate it); a forward with gradients drops it. Set ``inference_cache = False`` on a layer to trade
    speed for memory (the cache holds one dense (out, in) weight per layer).
    """

    inference_cache: bool = True
    spectral_path: str = "auto"  # "auto" | "factored" | "materialized" (training forwards)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int,
        config,
        layer_key: str,
        defer_svd: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        SSTLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self._sst_seen_S: torch.Tensor | None = None  # S at the last training forward (one layer per model)
        self._sst_cache: tuple[tuple, torch.Tensor] | None = None
        # adapter -> (factor key, weight): the exact effective weight a compact adapter stored, used while the
        # factors rebuilt from it (an SVD) are unchanged, so that a reload computes with the saved weight
        self._sst_pinned: dict[str, tuple[tuple, torch.Tensor]] = {}
        self._sst_to_pin: dict[
            str, torch.Tensor
        ] = {}  # from a state dict, pinned once its factors are loaded
        self.register_load_state_dict_post_hook(SSTLinear._pin_loaded_weights)
        self.update_layer(adapter_name, r, config, layer_key, defer_svd=defer_svd)

    def factors_changed(self) -> None:
        self._sst_cache = None

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        for adapter in self.sst_S:
            self._check_loaded_index(prefix, adapter, state_dict.get(f"{prefix}sst_index.{adapter}"))
            names = [f"{prefix}{name}.{adapter}" for name in _FACTOR_NAMES]
            touched = f"{prefix}sst_touched.{adapter}"
            if names[0] in state_dict and touched not in state_dict:  # a checkpoint older than sst_touched:
                state_dict[touched] = torch.ones_like(self.sst_touched[adapter])  # assume all changed
            dense = state_dict.pop(f"{prefix}{DENSE_WEIGHT_KEY}.{adapter}", None)
            if dense is not None:
                self._sst_to_pin[adapter] = dense
            if adapter in self.sst_unloaded and all(name in state_dict for name in names):
                self.sst_unloaded.discard(adapter)
                self.free_base_weight()  # a compact adapter kept it for its SVD
        self._sst_seen_S = None  # a load is not a training step
        self._sst_cache = None
        self._sst_pinned = {}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def _check_loaded_index(self, prefix: str, adapter: str, index: torch.Tensor | None) -> None:
        """A saved ``sst_index`` must name ``r`` distinct singular directions of this layer: a tampered or
        corrupt one (a duplicate, out of range) would train and run on the wrong vectors silently."""
        if index is None:
            return
        r, k = self.sst_index[adapter].numel(), self.sst_S[adapter].numel()
        where = f"{prefix}sst_index.{adapter}"
        fix = "the adapter was edited or is corrupt; save it again from the trained model"
        if index.dtype.is_floating_point or index.dtype == torch.bool or tuple(index.shape) != (r,):
            raise ValueError(
                f"{where} must be {r} integer indices, got {index.dtype} {tuple(index.shape)}; {fix}"
            )
        values = index.detach().to("cpu", torch.int64)
        if r and (int(values.min()) < 0 or int(values.max()) >= k):
            raise ValueError(f"{where} holds indices outside 0..{k - 1}; {fix}")
        if values.unique().numel() != r:
            raise ValueError(f"{where} repeats an index (the {r} active directions must be distinct); {fix}")

    @staticmethod
    def _pin_loaded_weights(module: SSTLinear, incompatible_keys) -> None:
        # after the factor containers (child modules) have loaded: their versions are final now
        for adapter, weight in module._sst_to_pin.items():
            module.pin_effective_weight_(adapter, weight)
        module._sst_to_pin = {}

    def pin_effective_weight_(self, adapter: str, weight: torch.Tensor) -> None:
        """Compute with ``weight`` (out, in) while the factors keep their current values (no-gradient forwards,
        :meth:`get_delta_weight`); the first change of a factor drops it."""
        key = _version_key(self.factors(adapter))
        self._sst_pinned[adapter] = (key, weight.to(self.sst_S[adapter].device))

    def _pinned(self, adapter: str) -> torch.Tensor | None:
        entry = self._sst_pinned.get(adapter)
        if entry is None:
            return None
        if entry[0] != _version_key(self.factors(adapter)):
            del self._sst_pinned[adapter]
            return None
        return entry[1]

    @torch.no_grad()
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        pinned = self._pinned(adapter)
        if pinned is not None:
            return pinned.float()
        return super().get_delta_weight(adapter)

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
        self.free_base_weight()

    def _check_loaded(self, adapter: str) -> None:
        if adapter in self.sst_unloaded:
            raise RuntimeError(
                f"the SST factors of adapter {adapter!r} were allocated without an SVD (init_weights=False, as in a "
                "saved adapter_config.json) and have not been loaded: use PeftModel.from_pretrained(model, folder) "
                "or set init_weights=True to start from the base weights"
            )

    def _active_sst_adapter(self) -> str:
        active = self._active_adapter
        if isinstance(active, list) and len(active) == 1:
            active = active[0]
        if isinstance(active, str) and active in self.sst_dicts[1]:  # the common case, fast
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
        watch = self.sst_watch
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
        key = _version_key((U, S, Vh, idx, Ua, Vha), x)
        if self._sst_cache is not None and self._sst_cache[0] == key:
            return self._sst_cache[1]
        weight = inference_weight(U, S, Vh, idx, Ua, Vha, x)
        self._sst_cache = (key, weight)
        return weight

    def clear_inference_cache(self) -> None:
        """Free the cached inference weight (it is rebuilt on the next no-gradient forward)."""
        self._sst_cache = None

    def _merged_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and not self.sst_watch.warned_merged_training:
            self.sst_watch.warned_merged_training = True
            warnings.warn(
                "the SST adapter is merged: the forward uses the merged dense copy, so the SST factors would not "
                "train; call unmerge_adapter() before training (or merge_and_unload() for inference only)",
                UserWarning,
                stacklevel=3,
            )
        return self.base_layer(x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._disable_adapters:
            raise RuntimeError(
                "SST adapters cannot be disabled: SST replaced the base weight by its SVD factors and freed it, "
                "so there is no original layer to fall back to"
            )
        adapter = self._active_sst_adapter()
        if self.merged_adapters:
            return self._merged_forward(x, *args, **kwargs)
        if self.sst_unloaded:
            self._check_loaded(adapter)
        # Direct container access: this runs for every layer and every decoded token (ParameterDict and
        # BufferDict item access go through Module.__getattr__ and cost more than a small matmul).
        U, S, Vh, idx, Ua, Vha = (d[adapter] for d in self.sst_dicts)
        bias = self.base_layer.bias  # SST layers never nest (one adapter per model)
        if torch.is_grad_enabled() and (S.requires_grad or Ua.requires_grad or Vha.requires_grad):
            self._sst_cache = None  # the factors are about to change: free the inference copy
            if self.training:
                self._watch_training(adapter, S)
            return spectral_linear(
                x,
                S,
                Ua,
                Vha,
                bias,
                U,
                Vh,
                idx,
                enhanced=self.sst_settings[adapter]["enhanced_gradient"],
                path=self.spectral_path,
            )
        weight = self._pinned(adapter) if self._sst_pinned else None
        if weight is not None and (weight.dtype != x.dtype or torch.is_autocast_enabled(x.device.type)):
            weight = None  # stored for the base dtype without autocast; other inputs use the factors
        if weight is None and self.inference_cache:
            weight = self._cached_weight(U, S, Vh, idx, Ua, Vha, x)
        elif weight is None:
            weight = inference_weight(U, S, Vh, idx, Ua, Vha, x)
        # Frozen factors: y = x W^T + b with a constant W; x and the bias still get gradients if they need them.
        return linear_with_weight(x, weight, bias)

    def __repr__(self) -> str:
        return "sst." + super().__repr__()

    def extra_repr(self) -> str:
        s = self.sst_settings.get(self.active_adapters[0], {}) if self.active_adapters else {}
        return f"in_features={self.in_features}, out_features={self.out_features}, r={s.get('r')}, k={s.get('k')}"
