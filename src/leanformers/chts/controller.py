"""CHTssController: the plain-PyTorch driver of CHTs / CHTss (and SET / RigL / CHT / static sparse).

A :class:`leanformers.training.Controller` (``CHTssCallback`` drives it under the Trainer). Use it in
any loop::

    controller = CHTssController(model, optimizer, CHTssConfig(final_density=0.3), total_steps=10_000)
    for batch in data:
        loss = model(**batch).loss; loss.backward()
        optimizer.step(); controller.step(); optimizer.zero_grad()

``step()`` must run after every optimizer step (before ``zero_grad``): it re-masks weights and
moments and, every ``update_interval`` steps inside the topology window, rewires the masks. The
work lives in the modules it calls: ``initial`` (first topology), ``gradients`` (masked and dense
gradients), ``rewiring`` (one update's removal and regrowth), ``metrics``, ``state`` (checkpoints,
masks saved with the model).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from leanformers.chts.config import CHTssConfig
from leanformers.chts.gradients import GradientCapture
from leanformers.chts.initial import draw_initial_masks, sparse_init_layers, target_counts
from leanformers.chts.masks import SparseLayer, chain_removal, find_sparse_layers, save_masks
from leanformers.chts.metrics import layer_metrics
from leanformers.chts.predictors import REGROWTH_PREDICTORS, REMOVAL_SCORES
from leanformers.chts.rewiring import Rewiring
from leanformers.chts.schedules import auto_update_interval, num_updates, update_index, update_schedule
from leanformers.chts.state import (
    STATE_NAME,
    SaveMasksWithModel,
    adopt_saved_masks,
    check_weights_inside,
    checkpoint_tensors,
    masks_from_checkpoint,
    masks_saved_with,
)
from leanformers.training import Controller, LRRewarmup
from leanformers.training.distributed import agree_with_rank0
from leanformers.training.fsdp import is_fsdp2_model, local
from leanformers.training.optim import check_optimizer, mask_state_, unwrap_optimizer
from leanformers.training.sharding import check_sharding, unwrap_model

__all__ = ["STATE_NAME", "CHTssController", "check_unsharded"]

logger = logging.getLogger(__name__)


def check_unsharded(args=None, model: nn.Module | None = None, optimizer=None) -> None:
    """Refuse DeepSpeed ZeRO, FSDP1 and non-FSDP2 DTensor training (:func:`leanformers.training.check_sharding`)."""
    check_sharding("CHTss", args, model, optimizer)


class CHTssController(Controller):
    """Owns the masks of the sparse layers of ``model`` and rewires them during training.

    Args:
        model: any ``nn.Module`` (HF models included); DDP wrappers are unwrapped.
        optimizer: torch Adam / AdamW / SGD (accelerate wrappers accepted); may be attached later
            with :meth:`attach`. Others are refused with a clear error.
        config: a :class:`CHTssConfig`.
        total_steps: optimizer steps of the run (overrides ``config.total_steps``); required before
            the first step unless the run is static (``update_interval=0``).
        init_masks: set the initial topology now (False when a checkpoint's masks follow): the masks
            saved with the model (``model.name_or_path``) when present and ``config.masks_from_model``,
            else a new draw.
        input_correlation: (n, n) correlation of the model's input features, required by
            ``init_topology="correlated"`` (``topology.input_correlation(x_train)``).
    """

    state_name = STATE_NAME
    method_name = "CHTss"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        config: CHTssConfig | None = None,
        total_steps: int | None = None,
        init_masks: bool = True,
        input_correlation: torch.Tensor | None = None,
    ):
        self.config = config or CHTssConfig()
        self.config.validate()
        check_unsharded(model=model, optimizer=optimizer)
        self.model = unwrap_model(model)
        self.layers: list[SparseLayer] = find_sparse_layers(
            self.model, self.config.targets, self.config.exclude, self.config.balance_heads
        )
        self.total_steps = total_steps if total_steps is not None else self.config.total_steps
        self.update_interval = self._resolve_interval()
        self.global_step = 0
        self.optimizer = None
        self.rewarmup: LRRewarmup | None = None
        self.last_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        # FSDP2: the weights are DTensor shards; masks and moments are handled per shard, the topology
        # update gathers one whole matrix at a time.
        self.sharded = is_fsdp2_model(self.model)
        self._saved_masks: dict[str, torch.Tensor] = {}  # what save_pretrained writes under FSDP2
        for layer in self.layers:
            layer.set_mask(torch.ones(layer.shape, dtype=torch.bool))
        self.gradients = GradientCapture(self.layers, self.sharded)
        if optimizer is not None:
            self.attach(optimizer)
        if init_masks:
            self._init_topology(input_correlation)
        self._arm_gradients()
        SaveMasksWithModel.install(self.model, self.masks_for_saving)

    # ------------------------------------------------------------------ set-up
    def _resolve_interval(self) -> int | None:
        """``config.update_interval``, or the "auto" value for ``total_steps`` (None while unknown)."""
        cfg = self.config
        if cfg.update_interval != "auto":
            return int(cfg.update_interval)
        if self.total_steps is None:
            return None
        interval = auto_update_interval(self.total_steps, cfg.topology_end)
        logger.info(
            "CHTss update_interval='auto': every %d optimizer steps (%d topology updates in the first %g %% of "
            "%d steps)",
            interval,
            num_updates(self.total_steps, interval, cfg.topology_end),
            100 * cfg.topology_end,
            self.total_steps,
        )
        return interval

    def attach(self, optimizer: torch.optim.Optimizer, lr_scheduler=None) -> None:
        """Use ``optimizer`` for moment surgery and LR re-warm-up (refuses unsupported optimizers).

        ``lr_scheduler`` is accepted for the protocol; the re-warm-up scales the learning rate inside
        ``optimizer.step`` only, the user's schedule is left untouched.
        """
        if self.optimizer is not None and unwrap_optimizer(optimizer) is self.optimizer:
            return
        check_unsharded(optimizer=optimizer)  # before check_optimizer: ZeRO wraps a plain AdamW
        check_optimizer(optimizer)
        self.optimizer = unwrap_optimizer(optimizer)
        state = None
        if self.rewarmup is not None:  # another optimizer: the ramp moves over to it
            state = self.rewarmup.state_dict()
            self.rewarmup.remove()
            self.rewarmup = None
        if self.config.rewarmup_steps > 0:
            self.rewarmup = LRRewarmup(self.optimizer)
            if state is not None:
                self.rewarmup.load_state_dict(state)

    @torch.no_grad()
    def _init_topology(self, input_correlation: torch.Tensor | None) -> None:
        saved = masks_saved_with(self.model) if self.config.masks_from_model else None
        if saved is not None:
            masks, self.config = adopt_saved_masks(self.config, self.layers, *saved)
            for layer, mask in zip(self.layers, masks):
                layer.set_mask(mask)
        else:
            for layer, mask in zip(
                self.layers, draw_initial_masks(self.config, self.layers, input_correlation)
            ):
                layer.set_mask(mask)
            if self.config.sparse_init:
                sparse_init_layers(self.config, self.layers)
        self._masks_changed()

    @property
    def total_updates(self) -> int:
        """Number of topology updates of the run (U)."""
        if self.total_steps is None or not self.update_interval:
            return 0
        return num_updates(self.total_steps, self.update_interval, self.config.topology_end)

    def check_schedule(self) -> None:
        """Raise when CHTss could not reach ``final_density`` inside the topology window."""
        if self.config.is_chtss and self.total_updates == 0:
            raise ValueError(
                f"CHTss needs at least one topology update to go from initial_density={self.config.initial_density} "
                f"to final_density={self.config.final_density}, but total_steps={self.total_steps} x topology_end="
                f"{self.config.topology_end} < update_interval={self.update_interval}. Lower update_interval "
                "(or leave it 'auto') or train longer."
            )

    def _arm_gradients(self) -> None:
        """Collect dense gradients during the backward passes of the step that ends with an update."""
        cfg = self.config
        needs = REGROWTH_PREDICTORS[cfg.regrowth].needs_gradient or REMOVAL_SCORES[cfg.removal].needs_gradient
        due = update_index(self.global_step + 1, self.update_interval or 0, self.total_updates)
        self.gradients.arm(needs and due is not None)

    # ------------------------------------------------------------------ per step
    @torch.no_grad()
    def apply_masks_(self) -> None:
        """Zero masked weights and their optimizer moments."""
        for layer in self.layers:
            local(layer.weight.data).mul_(layer.multiplier)  # in place, by the 0/1 view of the (local) mask
            if self.optimizer is not None:
                mask_state_(self.optimizer, layer.weight, layer.mask_param)

    def step(
        self, optimizer=None, lr_scheduler=None, global_step: int | None = None
    ) -> dict[str, float] | None:
        """Call after every optimizer step. Returns the update's metrics when the topology changed.

        Args:
            optimizer: attached when given (see :meth:`attach`).
            global_step: optimizer steps done including this one (Trainer); default: count one more.
        """
        if optimizer is not None:
            self.attach(optimizer, lr_scheduler)
        if self.layers[0].sharded != self.sharded:
            raise RuntimeError(
                "the model was sharded (fully_shard) after the CHTss controller was built: its masks and gradient "
                "hooks belong to the unsharded parameters. Build CHTssController after fully_shard (the Trainer's "
                "CHTssCallback does, in on_train_begin)."
            )
        if self.total_steps is None and self.update_interval != 0:
            raise ValueError(
                "CHTssController needs total_steps (the optimizer steps of the run) to schedule its topology "
                "updates: pass CHTssController(..., total_steps=N) or CHTssConfig(total_steps=N) (the Trainer's "
                "CHTssCallback passes max_steps)."
            )
        self.global_step = self.global_step + 1 if global_step is None else int(global_step)
        self.apply_masks_()
        metrics = None
        u = update_index(self.global_step, self.update_interval or 0, self.total_updates)
        if u is not None:
            metrics = self.update(u)
        self._arm_gradients()
        return metrics

    # ------------------------------------------------------------------ one topology update
    @torch.no_grad()
    def update(self, u: int) -> dict[str, float]:
        """Topology update number ``u`` (1..U): prune to d(u), remove zeta(u), regrow to the target."""
        cfg = self.config
        start = time.perf_counter()
        plan = update_schedule(cfg, u, self.total_updates, self.total_steps, self.update_interval)
        targets = target_counts(cfg, self.layers, plan.density)
        # EM_S: the removal keeps exactly the final density's links, whatever zeta says.
        keeps = None if plan.keep_density is None else target_counts(cfg, self.layers, plan.keep_density)
        self.gradients.reduce_over_ranks()
        rewiring = Rewiring(self.layers, cfg, self.gradients)
        kept, removed = rewiring.remove(u, targets, plan.zeta, plan.temperature, keeps)
        n_chain = 0
        if cfg.chain_removal:  # links of neurons left without inputs or outputs
            chained = chain_removal(kept, self.layers)
            n_chain = sum(int(a.sum() - b.sum()) for a, b in zip(kept, chained))
            kept = chained
        # Inputs agree across ranks (seeded draws, reduced gradients): a guard, so that regrowth and the
        # moment surgery start from rank 0's kept links. Differences mean the ranks' inputs differed.
        n_disagree = sum(agree_with_rank0(keep) for keep in kept)
        n_removed = sum(int(r.sum()) for r in removed) + n_chain
        counts = rewiring.regrow(u, kept, removed, targets, self.optimizer)
        n_disagree += counts["disagree"]
        self._report(u, counts["filled"], n_disagree)
        if self.rewarmup is not None:
            self.rewarmup.restart(cfg.rewarmup_steps)
        self._masks_changed()
        metrics = self.metrics()
        metrics.update(
            {
                "chtss/update": float(u),
                "chtss/update_interval": float(self.update_interval),
                "chtss/target_density": float(plan.density),
                "chtss/zeta": float(plan.zeta),
                "chtss/temperature": float(plan.temperature),
                "chtss/removed": float(n_removed),
                "chtss/regrown": float(counts["grown"]),
                "chtss/rewired": float(counts["grown"]),
                "chtss/chain_removed": float(n_chain),
                "chtss/removed_regrown_overlap": counts["overlap"] / max(1, counts["grown"]),
                "chtss/filled_uniform": float(counts["filled"]),
                "chtss/rank_disagreement": float(n_disagree),
                "chtss/predictor_ms": counts["predictor_ms"],
                "chtss/update_ms": (time.perf_counter() - start) * 1000.0,
            }
        )
        self.last_metrics = metrics
        self.history.append(metrics)
        return metrics

    @staticmethod
    def _report(u: int, filled: int, disagree: int) -> None:
        if filled:
            logger.info(
                "CHTss update %d: %d regrown links filled uniformly (too few positive scores)", u, filled
            )
        if disagree:
            logger.warning(
                "CHTss update %d: this rank chose %d links differently from rank 0 (rank 0's masks are used): "
                "the update's inputs differ across ranks",
                u,
                disagree,
            )

    # ------------------------------------------------------------------ reporting, masks
    def metrics(self) -> dict[str, float]:
        """Density per layer and overall (sparse subset and whole model), active-neuron fractions."""
        return layer_metrics(self.layers, self.model)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """{module name: (out, in) bool mask} (gathered under FSDP2: a collective)."""
        return {layer.name: layer.mask for layer in self.layers}

    def _masks_changed(self) -> None:
        """Re-mask weights and moments; under FSDP2 keep a gathered CPU copy for ``save_pretrained``."""
        self.apply_masks_()
        if self.sharded:  # every rank is here (init, update, restore): the gathering collective is safe
            self._saved_masks = {name: mask.cpu() for name, mask in self.masks.items()}

    def masks_for_saving(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``({name: (out, in) CPU mask}, meta)`` for ``save_pretrained``: no collective, on any rank."""
        masks = self._saved_masks if self.sharded else {k: v.cpu() for k, v in self.masks.items()}
        meta = {"config": self.config.to_dict(), "global_step": self.global_step}
        return masks, meta

    def save_masks(self, folder) -> None:
        """Masks for a saved model (restore with ``chts.load_masks`` / ``apply_masks``); ``save_pretrained``
        of the model writes them too."""
        save_masks(folder, *self.masks_for_saving())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta): bit-packed masks + step, schedule, RNG seed and re-warm-up state."""
        tensors, meta = checkpoint_tensors(self.layers)
        meta.update(
            {
                "step_count": self.global_step,
                "total_steps": self.total_steps,
                "update_interval": self.update_interval,
                "seed": self.config.seed,  # every draw is seeded_generator(seed, phase, update, layer)
                "config": self.config.to_dict(),
                "rewarmup": self.rewarmup.state_dict() if self.rewarmup is not None else None,
                "last_metrics": self.last_metrics,
            }
        )
        return tensors, meta

    @torch.no_grad()
    def load_state_dict(
        self, tensors: dict[str, torch.Tensor], meta: dict, check_weights: bool = False
    ) -> None:
        """Restore masks and counters and re-apply the masks (call before the first forward).

        Args:
            check_weights: the weights were loaded from the same checkpoint (Trainer resume): they are
                exactly zero outside its masks, so a non-zero weight outside the loaded masks means the
                masks belong to another run or step; raise instead of zeroing trained weights.
        """
        masks = masks_from_checkpoint(self.layers, tensors, meta)
        if check_weights:
            check_weights_inside(self.layers, masks, "the checkpoint's CHTss masks")
        for layer, mask in zip(self.layers, masks):
            layer.set_mask(mask)
        self.global_step = int(meta["step_count"])
        if meta.get("total_steps") is not None and self.total_steps is None:
            self.total_steps = int(meta["total_steps"])
        if self.config.update_interval == "auto":  # the run's interval, even if the run length changed
            self.update_interval = meta.get("update_interval") or self._resolve_interval()
        if meta.get("rewarmup") and self.rewarmup is not None:
            self.rewarmup.load_state_dict(meta["rewarmup"])
        self.last_metrics = dict(meta.get("last_metrics") or {})
        self._masks_changed()
        self._arm_gradients()

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self.state_dict()

    def restore_state(
        self, tensors: dict[str, torch.Tensor], meta: dict, check_weights: bool = False
    ) -> None:
        self.load_state_dict(tensors, meta, check_weights=check_weights)

    def remove(self) -> None:
        """Detach the gradient hooks, the LR re-warm-up and the ``save_pretrained`` hook (masks stay applied)."""
        self.gradients.remove()
        SaveMasksWithModel.uninstall(self.model)
        if self.rewarmup is not None:
            self.rewarmup.remove()
            self.rewarmup = None
