"""``SSTController``: the SST schedule, a :class:`leanformers.training.Controller` (``SSTCallback`` drives it).

Counters run on optimizer steps (Trainer ``global_step``), never on micro-batches, so gradient
accumulation changes nothing. Per optimizer step:

1. clamp S >= 0 and renormalise the active vectors;
2. every ``steps_per_iteration`` steps: write the active vectors back, re-SVD the layers whose
   round ends, draw new indices, copy their vectors in place, reset the optimizer state of the
   active vectors (and of S after a re-SVD), and restart the LR re-warm-up.

Custom loop::

    controller = SSTController(model)
    for batch in data:
        loss = model(**batch).loss; loss.backward()
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
        controller.step(optimizer)
"""

from __future__ import annotations

import time

import torch
from torch import nn

from leanformers.sst.layer import SSTLayer, find_sst_layers
from leanformers.sst.sampling import effective_rank
from leanformers.training import LRRewarmup, check_optimizer, reset_state, unwrap_optimizer
from leanformers.training.controller import Controller
from leanformers.training.distributed import broadcast_, is_distributed
from leanformers.training.fsdp import gather_full, write_full_
from leanformers.training.sharding import check_sharding, requested_fsdp_version

__all__ = ["STATE_NAME", "SSTController", "check_backend", "requested_fsdp_version"]

STATE_NAME = "sst_controller"


def check_backend(args=None, model: nn.Module | None = None, optimizer=None) -> None:
    """Refuse the sharded backends SST cannot drive (DeepSpeed ZeRO, FSDP1); FSDP2 and DDP are fine.

    The policy shared with CHTss: :func:`leanformers.training.sharding.check_sharding`.
    """
    check_sharding("SST", args, model, optimizer)


class SSTController(Controller):
    """Drives the SST iterations/rounds of every SST layer in ``model``.

    Args:
        model: a PeftModel (or any module) holding :class:`SSTLayer` modules; DDP wrappers and FSDP2
            (``fully_shard``) are fine; DeepSpeed ZeRO and FSDP1 are refused (:func:`check_backend`).
        optimizer: optional; may also be passed to :meth:`step` / :meth:`attach`. Adam, AdamW or SGD.

    Under FSDP2 the sharded factors (S, active vectors) are gathered one layer at a time where a whole
    matrix is needed (renormalisation, write-back, re-SVD, re-sampling), the result is computed identically
    on every rank and written back into each rank's shard; the inference cache is switched off (it would
    keep a dense copy of every layer on every rank).
    """

    state_name = STATE_NAME
    method_name = "SST"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        check_backend(model=model, optimizer=optimizer)
        self.layers: dict[str, SSTLayer] = find_sst_layers(model, required=True)
        for layer in self.layers.values():
            layer.sst_watch.controlled = True  # silences the "trained without a controller" warning
            if layer.sst_sharded:
                layer.inference_cache = False  # a dense (out, in) copy per layer would undo the sharding
                layer.clear_inference_cache()
        first = next(iter(self.layers.values()))
        self.adapter = first.active_adapters[0]
        settings = first.sst_settings[self.adapter]
        self.steps_per_iteration = int(settings["steps_per_iteration"])
        self.warmup_steps = int(settings["warmup_steps_per_iteration"])
        self.global_step = 0
        self.optimizer = None
        self.rewarmup: LRRewarmup | None = None
        self.last_metrics: dict[str, float] = {}
        self._pending_rewarmup: dict | None = None
        self._sync_from_rank0()
        if optimizer is not None:
            self.attach(optimizer)

    @torch.no_grad()
    def _sync_from_rank0(self) -> None:
        """Rank 0's SST state on every rank (no-op in one process).

        SST's buffers are on DDP's ignore list (see ``exclude_sst_buffers_from_ddp``), so DDP's start-up sync
        does not cover them; one broadcast here makes ranks agree even if they built the model differently.
        FSDP2 shards are gathered, broadcast whole and cut again (one tensor at a time).
        """
        if not is_distributed():
            return
        for layer in self.layers.values():
            for name in SSTLayer.adapter_layer_names + SSTLayer.other_param_names:
                tensor = getattr(layer, name)[self.adapter]
                write_full_(tensor, broadcast_(gather_full(tensor)))  # in place when plain

    # ----------------------------------------------------------------------------- optimizer
    def attach(self, optimizer: torch.optim.Optimizer, lr_scheduler=None) -> None:
        """Use ``optimizer`` (checked: Adam/AdamW/SGD) and hook the LR re-warm-up onto it.

        ``lr_scheduler`` is accepted for the protocol; the user's schedule is left untouched (the
        re-warm-up scales the learning rate inside ``optimizer.step`` only).
        """
        inner = unwrap_optimizer(optimizer)
        if self.optimizer is inner:
            return
        check_optimizer(inner)
        if self.rewarmup is not None:
            state = self.rewarmup.state_dict()
            self.rewarmup.remove()
        else:  # restored by load_state_dict before an optimizer was known, or derived from the step
            state = self._pending_rewarmup or self._rewarmup_state_for(self.global_step)
        self._pending_rewarmup = None
        self.optimizer = inner
        self.rewarmup = LRRewarmup(inner)
        self.rewarmup.load_state_dict(state)

    def _rewarmup_state_for(self, global_step: int) -> dict:
        """Where the re-warm-up ramp stands after ``global_step`` steps (derivable from the step alone)."""
        iteration, into = divmod(global_step, self.steps_per_iteration)
        if iteration == 0 or self.warmup_steps == 0:
            return {"num_steps": 0, "steps_done": 0}
        return {"num_steps": self.warmup_steps, "steps_done": min(into, self.warmup_steps)}

    def _active_params(self):
        for layer in self.layers.values():
            yield layer.sst_U_active[self.adapter]
            yield layer.sst_Vh_active[self.adapter]

    # ----------------------------------------------------------------------------- schedule
    @torch.no_grad()
    def step(
        self, optimizer=None, lr_scheduler=None, global_step: int | None = None
    ) -> dict[str, float] | None:
        """Call once after every optimizer step (after ``zero_grad`` is fine).

        Args:
            optimizer: the optimizer (needed from the first iteration boundary on).
            lr_scheduler: accepted for symmetry; the user's schedule is left untouched (the re-warm-up
                scales the learning rate inside ``optimizer.step`` only).
            global_step: optimizer steps done so far (Trainer ``state.global_step``); default: count.
        Returns:
            round metrics when at least one layer finished a round at this step, else None.
        """
        if optimizer is not None:
            self.attach(optimizer)
        self.global_step = self.global_step + 1 if global_step is None else int(global_step)
        for layer in self.layers.values():
            layer.post_step_(self.adapter)
        if self.global_step % self.steps_per_iteration != 0:
            return None
        if self.optimizer is None:
            raise ValueError("SSTController.step needs the optimizer at iteration boundaries: pass it once")
        return self._new_iteration()

    def _new_iteration(self) -> dict[str, float] | None:
        resvd_seconds = 0.0
        ranks, errors_before, errors_after = [], [], []
        for layer in self.layers.values():
            t0 = time.perf_counter()
            ended = layer.start_iteration_(self.adapter)
            if ended:
                resvd_seconds += time.perf_counter() - t0
                before, after = layer.last_orthogonality_errors
                errors_before.append(before)
                errors_after.append(after)
                ranks.append(effective_rank(gather_full(layer.sst_S[self.adapter])))
                reset_state(self.optimizer, layer.sst_S[self.adapter])
        for param in self._active_params():
            reset_state(self.optimizer, param)  # moments and step count of the swapped-in vectors
        if self.warmup_steps > 0 and self.rewarmup is not None:
            self.rewarmup.restart(self.warmup_steps)
        if not ranks:
            return None
        self.last_metrics = {
            "sst/effective_rank": sum(ranks) / len(ranks),
            "sst/orthogonality_error_before_resvd": max(errors_before),
            "sst/orthogonality_error": max(errors_after),
            "sst/resvd_seconds": resvd_seconds,
            "sst/layers_resvd": float(len(ranks)),
        }
        return self.last_metrics

    @property
    def last_round_metrics(self) -> dict[str, float] | None:
        """Metrics of the last round (None before the first re-SVD); same as :meth:`metrics`."""
        return self.last_metrics or None

    def metrics(self) -> dict[str, float]:
        """The last round's metrics (effective rank, orthogonality errors, re-SVD time); {} before one."""
        return dict(self.last_metrics)

    def remove(self) -> None:
        """Detach the LR re-warm-up from the optimizer (its state is kept for the next :meth:`attach`)."""
        if self.rewarmup is not None:
            self._pending_rewarmup = self.rewarmup.state_dict()
            self.rewarmup.remove()
            self.rewarmup = None
            self.optimizer = None

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Controller state (the layers' indices/counters live in the model's adapter weights)."""
        out = {"global_step": self.global_step}
        if self.rewarmup is not None:
            out["rewarmup"] = self.rewarmup.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])
        rewarm = state.get("rewarmup") or self._rewarmup_state_for(self.global_step)
        if self.rewarmup is not None:
            self.rewarmup.load_state_dict(rewarm)
        else:
            self._pending_rewarmup = rewarm

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, self.state_dict()

    def restore_state(
        self, tensors: dict[str, torch.Tensor], meta: dict, check_weights: bool = False
    ) -> None:
        self.load_state_dict(meta)

    def resume_without_state(self, folder, global_step: int) -> None:
        """A checkpoint without controller state: the schedule is derived from the step (the layers' indices
        and counters are in the model's adapter weights)."""
        self.load_state_dict({"global_step": global_step})
