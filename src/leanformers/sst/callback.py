"""The SST schedule: ``SSTController`` (plain PyTorch) and the thin ``SSTCallback`` (HF Trainer).

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
from transformers import TrainerCallback

from leanformers.sst.layer import SSTLayer
from leanformers.sst.model import exclude_sst_buffers_from_ddp
from leanformers.sst.spectral import effective_rank, orthogonality_error
from leanformers.training import (
    LRRewarmup,
    check_optimizer,
    checkpoint_folder,
    load_state,
    reset_state,
    resume_folder,
    save_state,
    unwrap_optimizer,
)
from leanformers.training.distributed import broadcast_, is_distributed

__all__ = ["SSTCallback", "SSTController"]

STATE_NAME = "sst_controller"


def _refuse_fsdp(model: nn.Module) -> None:
    for module in model.modules():
        name = type(module).__name__
        if name in ("FullyShardedDataParallel", "FSDPModule") or name.startswith("FSDP"):
            raise NotImplementedError(
                "SST under FSDP is not supported yet: the re-SVD needs each layer's full factors on every rank. "
                "Use DDP (accelerate launch / torchrun without an FSDP config) or a single process."
            )


class SSTController:
    """Drives the SST iterations/rounds of every SST layer in ``model``.

    Args:
        model: a PeftModel (or any module) holding :class:`SSTLayer` modules; DDP wrappers are fine.
        optimizer: optional; may also be passed to :meth:`step` / :meth:`attach`. Adam, AdamW or SGD.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        _refuse_fsdp(model)
        self.layers: dict[str, SSTLayer] = {n: m for n, m in model.named_modules() if isinstance(m, SSTLayer)}
        if not self.layers:
            raise ValueError(
                "the model holds no SST layer: wrap it with peft.get_peft_model(model, leanformers.SSTConfig(...)) "
                "before creating an SSTController / SSTCallback"
            )
        for layer in self.layers.values():
            layer._sst_watch.controlled = True  # silences the "trained without a controller" warning
        first = next(iter(self.layers.values()))
        self.adapter = first.active_adapters[0]
        settings = first.sst_settings[self.adapter]
        self.steps_per_iteration = int(settings["steps_per_iteration"])
        self.warmup_steps = int(settings["warmup_steps_per_iteration"])
        self.global_step = 0
        self.optimizer = None
        self.rewarmup: LRRewarmup | None = None
        self.last_round_metrics: dict[str, float] | None = None
        self._pending_rewarmup: dict | None = None
        self._sync_from_rank0()
        if optimizer is not None:
            self.attach(optimizer)

    @torch.no_grad()
    def _sync_from_rank0(self) -> None:
        """Rank 0's SST state on every rank (no-op in one process).

        SST's buffers are on DDP's ignore list (see ``exclude_sst_buffers_from_ddp``), so DDP's start-up sync
        does not cover them; one broadcast here makes ranks agree even if they built the model differently.
        """
        if not is_distributed():
            return
        for layer in self.layers.values():
            for name in (
                "sst_U",
                "sst_Vh",
                "sst_S",
                "sst_U_active",
                "sst_Vh_active",
                "sst_index",
                "sst_counters",
            ):
                broadcast_(getattr(layer, name)[self.adapter])

    # ----------------------------------------------------------------------------- optimizer
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Use ``optimizer`` (checked: Adam/AdamW/SGD) and hook the LR re-warm-up onto it."""
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
            U, Vh = layer.sst_U[self.adapter], layer.sst_Vh[self.adapter]
            counters = layer.sst_counters[self.adapter]
            round_ends = (int(counters[0]) + 1) % int(counters[2]) == 0
            if round_ends:
                layer.write_back_(self.adapter)
                errors_before.append(orthogonality_error(U, Vh))
            ended = layer.start_iteration_(self.adapter)
            if ended:
                resvd_seconds += time.perf_counter() - t0
                errors_after.append(orthogonality_error(U, Vh))
                ranks.append(effective_rank(layer.sst_S[self.adapter]))
                reset_state(self.optimizer, layer.sst_S[self.adapter])
        for param in self._active_params():
            reset_state(self.optimizer, param)  # moments and step count of the swapped-in vectors
        if self.warmup_steps > 0 and self.rewarmup is not None:
            self.rewarmup.restart(self.warmup_steps)
        if not ranks:
            return None
        self.last_round_metrics = {
            "sst/effective_rank": sum(ranks) / len(ranks),
            "sst/orthogonality_error_before_resvd": max(errors_before),
            "sst/orthogonality_error": max(errors_after),
            "sst/resvd_seconds": resvd_seconds,
            "sst/layers_resvd": float(len(ranks)),
        }
        return self.last_round_metrics

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

    def save(self, folder) -> None:
        """Write the controller state into a (Trainer checkpoint) folder."""
        save_state(folder, STATE_NAME, {}, self.state_dict())

    def load(self, folder) -> bool:
        """Restore what :meth:`save` wrote; False when the folder holds no SST state."""
        loaded = load_state(folder, STATE_NAME)
        if loaded is None:
            return False
        self.load_state_dict(loaded[1])
        return True


class SSTCallback(TrainerCallback):
    """Forward Trainer events to an :class:`SSTController` (created at ``on_train_begin``).

    Round metrics (effective rank, orthogonality error, re-SVD time) are added to the next Trainer
    log; controller state goes into every checkpoint and is restored on resume.
    """

    def __init__(self):
        self.controller: SSTController | None = None
        self._pending_logs: dict[str, float] = {}

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # The Trainer has already built its DDP settings from args.ddp_broadcast_buffers at this point (in
        # Trainer.__init__, before on_init_end), so setting that flag here would change nothing; instead SST's
        # buffers go on DDP's ignore list of the model the Trainer will wrap (at train()).
        if model is not None:
            exclude_sst_buffers_from_ddp(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.controller = SSTController(model)
        folder = resume_folder(args, state)
        if folder is not None and not self.controller.load(folder):
            self.controller.load_state_dict({"global_step": state.global_step})
        self.controller.global_step = state.global_step
        if optimizer is not None:
            self.controller.attach(optimizer)

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        metrics = self.controller.step(optimizer, lr_scheduler, global_step=state.global_step)
        if metrics:
            self._pending_logs.update(metrics)
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending_logs and logs is not None:
            logs.update(self._pending_logs)
            if state.log_history:
                state.log_history[-1].update(self._pending_logs)
            self._pending_logs = {}

    def on_save(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.save(checkpoint_folder(args, state))
