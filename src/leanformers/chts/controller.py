"""CHTssController: the plain-PyTorch driver of CHTs / CHTss (and SET / RigL / CHT / static sparse).

A :class:`leanformers.training.Controller` (``CHTssCallback`` drives it under the Trainer). Use it in
any loop::

    sched = CHTssController(model, optimizer, CHTssConfig(final_density=0.3), total_steps=10_000)
    for batch in data:
        loss = model(**batch).loss; loss.backward()
        optimizer.step(); sched.step(); optimizer.zero_grad()

``step()`` must run after every optimizer step (before ``zero_grad``): it re-masks weights and
moments and, every ``update_interval`` steps inside the topology window, rewires the masks.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from leanformers.chts import predictors, schedules
from leanformers.chts.config import CHTssConfig
from leanformers.chts.masks import (
    SparseLayer,
    active_neurons,
    chain_removal,
    find_sparse_layers,
    pack_mask,
    save_masks,
    split_count,
    unpack_mask,
)
from leanformers.chts.sampling import select_mask
from leanformers.chts.topology import brf_mask, correlated_mask, erk_densities, link_count, sparse_init_
from leanformers.training import Controller, LRRewarmup
from leanformers.training.distributed import (
    all_reduce_mean_,
    broadcast_,
    is_distributed,
    seeded_generator,
    sharded_training_backend,
)
from leanformers.training.fsdp import (
    gather_full,
    is_fsdp2_model,
    local,
    queue_after_backward,
    shard_like,
    write_full_,
)
from leanformers.training.optim import check_optimizer, mask_state_, unwrap_optimizer

__all__ = ["STATE_NAME", "CHTssController", "CHTssScheduler", "check_unsharded"]

logger = logging.getLogger(__name__)
STATE_NAME = "chtss"


_SHARDING_PROBLEM = {
    "DeepSpeed": "ZeRO keeps fp32 master weights and partitioned optimizer state that the masking never sees "
    "(stage 3 also partitions the weights), so removed links would keep training",
    "FSDP": "FSDP1 (FullyShardedDataParallel) flattens each unit's parameters into one FlatParameter, so "
    "a matrix, its mask and its optimizer moments have no (out, in) layout",
    "DTensor": "the parameters are DTensor shards outside FSDP2 (e.g. tensor parallelism), whose gradients "
    "the masking cannot reach before the optimizer step",
}
SUPPORTED_SHARDING = (None, "FSDP2")  # what check_unsharded lets through: one device, DDP, FSDP2
_FSDP2_HINT = (
    "PyTorch FSDP2 (fully_shard) is supported: TrainingArguments(fsdp=True, fsdp_config={'fsdp_version': 2}) "
    "or accelerate launch --config_file recipes/accelerate/fsdp2.yaml (docs/scaling.md); so are plain DDP "
    "and one device"
)


def check_unsharded(args=None, model: nn.Module | None = None, optimizer=None) -> None:
    """Refuse DeepSpeed ZeRO, FSDP1 and non-FSDP2 DTensor training with an error naming the problem.

    FSDP2 (``fully_shard``) is accepted: masks, weights and moments are then handled per shard.

    Args:
        args: ``transformers.TrainingArguments`` (``fsdp`` / ``deepspeed`` settings), optional.
        model, optimizer: as the training loop holds them (wrappers included), optional.
    """
    backend = sharded_training_backend(args, model, optimizer)
    if backend not in SUPPORTED_SHARDING:
        raise ValueError(
            f"CHTss does not support {backend} training: {_SHARDING_PROBLEM[backend]}. {_FSDP2_HINT}."
        )


@torch.no_grad()
def _agree_with_rank0(mask: torch.Tensor) -> int:
    """Overwrite ``mask`` in place with rank 0's copy; the number of entries that differed (0 in one process)."""
    if not is_distributed():
        return 0
    local = mask.clone()
    broadcast_(mask)
    return int((local != mask).sum())


def _unwrap_model(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / accelerate wrappers
        model = model.module
    return model


class CHTssController(Controller):
    """Owns the masks of the sparse layers of ``model`` and rewires them during training.

    Args:
        model: any ``nn.Module`` (HF models included); DDP wrappers are unwrapped.
        optimizer: torch Adam / AdamW / SGD (accelerate wrappers accepted); may be attached later
            with :meth:`attach`. Others are refused with a clear error.
        config: a :class:`CHTssConfig`.
        total_steps: optimizer steps of the run (overrides ``config.total_steps``); required before
            the first update.
        init_masks: draw the initial topology now (False when a checkpoint's masks follow).
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
        self.input_correlation = input_correlation
        self.config.validate()
        check_unsharded(model=model, optimizer=optimizer)
        self.model = _unwrap_model(model)
        self.layers: list[SparseLayer] = find_sparse_layers(
            self.model, self.config.targets, self.config.exclude, self.config.balance_heads
        )
        self.total_steps = total_steps if total_steps is not None else self.config.total_steps
        self.global_step = 0
        self.optimizer = None
        self.rewarmup: LRRewarmup | None = None
        self.last_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._collect_grads = False
        # Dense gradients of the step that ends with an update (RigL, MEST): whole (out, in) matrices
        # of this rank's data, or under FSDP2 local shards (param layout) of the reduced gradient.
        self._dense_grads: dict[int, torch.Tensor] = {}
        self._hooks = []
        # FSDP2: the weights are DTensor shards; masks and moments are handled per shard, the topology
        # update gathers one whole matrix at a time.
        self.sharded = is_fsdp2_model(self.model)
        for idx, layer in enumerate(self.layers):
            layer.set_mask(torch.ones(layer.shape, dtype=torch.bool))
            if not self.sharded:
                self._hooks.append(layer.weight.register_hook(self._make_grad_hook(idx)))
        if self.sharded:  # a gradient hook on a sharded parameter never fires: mask the reduced shards
            self._hooks.extend(
                queue_after_backward([layer.module for layer in self.layers], self._mask_sharded_grads)
            )
        if optimizer is not None:
            self.attach(optimizer)
        if init_masks:
            self._init_topology()
        self._arm_gradient_collection()

    # ------------------------------------------------------------------ setup
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

    attach_optimizer = attach  # the name before the controller protocol

    @property
    def step_count(self) -> int:
        """Optimizer steps done so far (the name before the controller protocol: ``global_step``)."""
        return self.global_step

    @step_count.setter
    def step_count(self, value: int) -> None:
        self.global_step = int(value)

    @property
    def total_updates(self) -> int:
        """Number of topology updates of the run (U)."""
        if self.total_steps is None or self.config.update_interval <= 0:
            return 0
        return schedules.num_updates(self.total_steps, self.config.update_interval, self.config.topology_end)

    def check_schedule(self) -> None:
        """Raise when CHTss could not reach ``final_density`` inside the topology window."""
        if self.config.is_chtss and self.total_updates == 0:
            raise ValueError(
                f"CHTss needs at least one topology update to go from initial_density={self.config.initial_density} "
                f"to final_density={self.config.final_density}, but total_steps={self.total_steps} x topology_end="
                f"{self.config.topology_end} < update_interval={self.config.update_interval}. Lower update_interval "
                "or train longer."
            )

    def _densities(self, density: float) -> list[float]:
        if self.config.layer_density == "erk" or self.config.init_topology == "erk":
            return erk_densities([layer.shape for layer in self.layers], density)
        return [density] * len(self.layers)

    def _target_counts(self, density: float) -> list[int]:
        return [link_count(layer.shape, d) for layer, d in zip(self.layers, self._densities(density))]

    @torch.no_grad()
    def _init_topology(self) -> None:
        cfg = self.config
        counts = self._target_counts(cfg.initial_density)
        for idx, (layer, k) in enumerate(zip(self.layers, counts)):
            device = local(layer.weight).device
            gen = seeded_generator(cfg.seed, "init", idx, device=device)
            n_out, n_in = layer.shape
            if cfg.init_topology == "brf" and layer.groups == 1:
                mask = brf_mask(
                    layer.shape, k / (n_out * n_in), cfg.brf_randomness, gen, device, cfg.brf_degrees
                )
            elif cfg.init_topology == "correlated":
                mask = self._correlated_mask(layer, k, gen)
            else:
                scores = torch.ones((n_out, n_in), device=device)
                chosen, _ = select_mask(
                    layer.to_groups(scores), split_count(k, layer.groups), None, "soft", 1.0, gen
                )
                mask = layer.from_groups(chosen)
            if is_distributed():
                broadcast_(mask)
            layer.set_mask(mask)
            if cfg.sparse_init:
                # The whole matrix is drawn on every rank (same generator); each rank keeps its shard.
                full = gather_full(layer.weight.data) if layer.sharded else layer.weight.data
                sparse_init_(
                    layer.logical(full),
                    mask,
                    seeded_generator(cfg.seed, "sparse_init", idx, device=device),
                    cfg.sparse_init_fan,
                )
                if layer.sharded:
                    write_full_(layer.weight.data, full)
        self.apply_masks_()

    def _correlated_mask(self, layer: SparseLayer, k: int, gen: torch.Generator) -> torch.Tensor:
        if self.input_correlation is None:
            raise ValueError(
                "init_topology='correlated' needs the input correlation: pass input_correlation="
                "leanformers.chts.topology.input_correlation(x_train) to CHTssController (bench/mlp_mnist.py's train_mlp does)."
            )
        if layer.groups != 1:
            raise ValueError(
                f"init_topology='correlated' cannot balance heads ({layer.name}); set balance_heads=False."
            )
        n_out, n_in = layer.shape
        corr = self.input_correlation.to(layer.weight.device)
        return correlated_mask(corr, layer.shape, k / (n_out * n_in), gen)

    def _make_grad_hook(self, idx: int):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            layer = self.layers[idx]
            if self._collect_grads:
                dense = layer.logical(grad).detach().to(torch.float32)
                if idx in self._dense_grads:
                    self._dense_grads[idx] += dense
                else:
                    self._dense_grads[idx] = dense.clone()
            return grad * layer.multiplier  # 0/1 uint8 view of the bool mask: no float copy kept

        return hook

    @torch.no_grad()
    def _mask_sharded_grads(self) -> None:
        """FSDP2, end of every backward: mask the reduced gradient shards (before clipping and the step).

        Masking after FSDP2's reduce-scatter equals masking before it (the mask is the same on every
        rank and the reduction is a sum). On a step that ends with a gradient-based update the dense
        gradient (local shard, before clipping) is kept in ``_dense_grads``: ``.grad`` holds the masked
        sum of the earlier micro-batches plus this one's dense gradient, so ``D <- D * ~mask + grad``
        keeps the masked-out entries' running sum and the links' sum (no second buffer).
        """
        for idx, layer in enumerate(self.layers):
            grad = layer.weight.grad
            if grad is None:
                continue
            shard = local(grad)
            if self._collect_grads:
                dense = self._dense_grads.get(idx)
                if dense is None:
                    self._dense_grads[idx] = shard.to(torch.float32, copy=True)
                else:
                    dense.mul_(~layer.mask_param).add_(shard)
            shard.mul_(layer.multiplier)

    def _dense_grad(self, idx: int) -> torch.Tensor | None:
        """The dense gradient (out, in) of layer ``idx`` for this update (whole matrix, float32), or None.

        Under FSDP2 it is gathered here from the local shards, one matrix at a time (a collective:
        every rank asks for the same layers in the same order).
        """
        if not self.sharded:
            return self._dense_grads.get(idx)
        if not self._collect_grads:
            return None
        layer = self.layers[idx]
        shard = self._dense_grads.get(idx)
        if shard is None:  # no gradient reached this layer: zeros, so that every rank gathers alike
            shard = torch.zeros(layer.mask_param.shape, dtype=torch.float32, device=layer.mask_param.device)
        return layer.logical(gather_full(shard, layer.weight))

    def _needs_gradient(self) -> bool:
        return self.config.regrowth == "gradient" or self.config.removal == "mest"

    def _arm_gradient_collection(self) -> None:
        """Collect dense gradients during the backward passes of the step that ends with an update."""
        next_step = self.global_step + 1
        due = schedules.update_index(next_step, self.config.update_interval, self.total_updates) is not None
        self._collect_grads = self._needs_gradient() and due
        self._dense_grads = {}

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
        self.global_step = self.global_step + 1 if global_step is None else int(global_step)
        self.apply_masks_()
        metrics = None
        u = schedules.update_index(self.global_step, self.config.update_interval, self.total_updates)
        if u is not None:
            metrics = self.update(u)
        self._arm_gradient_collection()
        return metrics

    # ------------------------------------------------------------------ one topology update
    def _regrowth_batches(self, kept: list[torch.Tensor], timer: list[float]):
        """Yield lists of (layer index, regrowth scores); same-shape layers are scored in one batched call.

        Scores are produced batch by batch and consumed by the caller, so that peak memory holds one
        batch of float32 scores, not the whole model's. Predictor time (ms) accumulates in ``timer[0]``.
        """
        cfg = self.config
        if cfg.regrowth.endswith("_L3n"):
            variant = cfg.regrowth[: -len("_L3n")]
            if variant == "CH3.1" and cfg.ch31_formula == "official":
                variant = "CH3.1_official"
            by_shape: dict[tuple, list[int]] = {}
            for idx, m in enumerate(kept):
                by_shape.setdefault((tuple(m.shape), m.device), []).append(idx)
            groups = [
                same[b0 : b0 + cfg.predictor_batch]
                for same in by_shape.values()
                for b0 in range(0, len(same), cfg.predictor_batch)
            ]
        else:
            groups = [[idx] for idx in range(len(kept))]
        for idxs in groups:
            start = time.perf_counter()
            if cfg.regrowth.endswith("_L3n"):
                batch = torch.stack([kept[i] for i in idxs])
                out = predictors.l3n_scores(batch, variant, cfg.predictor_chunk, cfg.allow_tf32)
                scores = [out[j] for j in range(len(idxs))]
            elif cfg.regrowth.endswith("_L3p"):
                scores = [predictors.l3p_scores(kept[i], cfg.regrowth[: -len("_L3p")]) for i in idxs]
            elif cfg.regrowth == "gradient":
                dense = [self._dense_grad(i) for i in idxs]
                scores = [
                    predictors.gradient_scores(g, kept[i])
                    if g is not None
                    else torch.zeros(kept[i].shape, device=kept[i].device)
                    for i, g in zip(idxs, dense)
                ]
            else:
                scores = [predictors.random_scores(kept[i]) for i in idxs]
            if kept[idxs[0]].is_cuda:
                torch.cuda.synchronize()
            timer[0] += (time.perf_counter() - start) * 1000.0
            yield list(zip(idxs, scores))

    def _reduce_dense_grads(self) -> None:
        """Average the collected dense gradients over ranks (MEST removal, RigL regrowth).

        The hook sees each rank's local gradient, before DDP's reduction (and DDP reduces only the
        masked one): without this every rank would score with its own data. The mean of the signed
        gradients is the gradient of the global batch, the quantity gradient accumulation gives on
        one rank (the official code averages |grad| per rank; both make the ranks agree). Every
        layer is reduced, zeros where a rank saw no gradient, so that all ranks issue the same calls.
        """
        for idx, layer in enumerate(self.layers):
            grad = self._dense_grads.get(idx)
            if grad is None:
                grad = torch.zeros(layer.shape, dtype=torch.float32, device=layer.weight.device)
                self._dense_grads[idx] = grad
            all_reduce_mean_(grad)

    def _removal_scores(self, idx: int, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scores (out, in) of the links to keep; ``w`` is the whole weight (out, in)."""
        if self.config.removal == "ri":
            return predictors.relative_importance(w, mask)
        if self.config.removal == "mest":
            return predictors.mest_scores(w, self._dense_grad(idx), self.config.mest_lambda)
        return predictors.weight_scores(w)

    def _remove(
        self, u: int, targets: list[int], zeta: float, temperature: float, keeps: list[int] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Steps 1-2 per layer: ``(kept, removed)`` links after pruning to the target and soft removal.

        ``keeps`` (EM_S schedule): links to keep per layer instead of pruning and removing a fraction zeta.
        """
        cfg = self.config
        kept: list[torch.Tensor] = []
        removed: list[torch.Tensor] = []
        for idx, (layer, target) in enumerate(zip(self.layers, targets)):
            gen = seeded_generator(cfg.seed, "remove", u, idx, device=local(layer.weight).device)
            mask = current = layer.mask  # whole matrices, one at a time (gathered under FSDP2)
            w = layer.full_weight()
            # 1. CHTss: hard prune to the scheduled density by relative importance (or |w|).
            if keeps is None and int(mask.sum()) > target:
                score = (
                    predictors.relative_importance(w, mask)
                    if cfg.prune_score == "ri"
                    else predictors.weight_scores(w)
                )
                mask, _ = self._select(layer, score, target, mask, "hard", 1.0, gen)
            # 2. Soft removal of a fraction zeta of the active links (sample the links to keep).
            n_active = int(mask.sum())
            n_keep = n_active - int(round(zeta * n_active)) if keeps is None else min(n_active, keeps[idx])
            keep, _ = self._select(
                layer,
                self._removal_scores(idx, w, mask),
                n_keep,
                mask,
                cfg.removal_sampling,
                temperature,
                gen,
            )
            kept.append(keep)
            removed.append(current & ~keep)
            del w
        return kept, removed

    def _regrow(
        self, u: int, kept: list[torch.Tensor], removed: list[torch.Tensor], targets: list[int]
    ) -> dict[str, float]:
        """Step 3: regrow every layer to exactly its target among non-links and install the new masks.

        Returns the counts ``filled`` (uniform fills), ``overlap`` (regrown links removed at this update),
        ``grown``, ``disagree`` (links where this rank chose differently from rank 0) and ``predictor_ms``.
        """
        cfg = self.config
        timer = [0.0]
        counts = dict.fromkeys(("filled", "overlap", "grown", "disagree"), 0)
        for batch in self._regrowth_batches(kept, timer):
            for idx, score in batch:
                layer, target = self.layers[idx], targets[idx]
                gen = seeded_generator(cfg.seed, "regrow", u, idx, device=local(layer.weight).device)
                n_grow = target - int(kept[idx].sum())
                grown, filled = self._select(
                    layer, score, n_grow, ~kept[idx], cfg.regrowth_sampling, 1.0, gen, kept[idx]
                )
                new_mask = kept[idx] | grown
                if is_distributed():  # guard: rank 0's masks win
                    counts["disagree"] += _agree_with_rank0(new_mask)
                    grown = new_mask & ~kept[idx]
                counts["filled"] += filled
                counts["overlap"] += int((grown & removed[idx]).sum())
                counts["grown"] += int(grown.sum())
                self._install(layer, new_mask, grown)
        return {**counts, "predictor_ms": timer[0]}

    @torch.no_grad()
    def update(self, u: int) -> dict[str, float]:
        """Topology update number ``u`` (1..U): prune to d(u), remove zeta(u), regrow to the target."""
        cfg = self.config
        start = time.perf_counter()
        total = self.total_updates
        plan = schedules.update_schedule(cfg, u, total, self.total_steps)
        density, zeta, temperature = plan.density, plan.zeta, plan.temperature
        targets = self._target_counts(density)
        # EM_S: the removal keeps exactly the final density's links, whatever zeta says.
        keeps = None if plan.keep_density is None else self._target_counts(plan.keep_density)
        if self._collect_grads and is_distributed() and not self.sharded:  # FSDP2 reduced them already
            self._reduce_dense_grads()
        kept, removed = self._remove(u, targets, zeta, temperature, keeps)
        # 5. Chain removal: links of neurons left without inputs or outputs.
        n_chain = 0
        if cfg.chain_removal:
            chained = chain_removal(kept, self.layers)
            n_chain = sum(int(a.sum() - b.sum()) for a, b in zip(kept, chained))
            kept = chained
        # Inputs agree across ranks (seeded draws, reduced gradients): a guard, so that removal, regrowth
        # and the moment surgery all start from rank 0's kept links. Differences are counted
        # (chtss/rank_disagreement): they mean the ranks' inputs differed.
        kept_disagree = sum(_agree_with_rank0(keep) for keep in kept)
        # 3. Regrowth to exactly the target count among non-links.
        counts = self._regrow(u, kept, removed, targets)
        n_disagree = kept_disagree + counts["disagree"]
        if counts["filled"]:
            logger.info(
                "CHTss update %d: %d regrown links filled uniformly (too few positive scores)",
                u,
                counts["filled"],
            )
        if n_disagree:
            logger.warning(
                "CHTss update %d: this rank chose %d links differently from rank 0 (rank 0's masks are used): "
                "the update's inputs differ across ranks",
                u,
                n_disagree,
            )
        if self.rewarmup is not None:
            self.rewarmup.restart(cfg.rewarmup_steps)
        metrics = self.metrics()
        metrics.update(
            {
                "chtss/update": float(u),
                "chtss/target_density": float(density),
                "chtss/zeta": float(zeta),
                "chtss/temperature": float(temperature),
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

    def _select(self, layer, scores, k, candidates, mode, temperature, gen, base=None):
        """Group-aware selection of exactly k entries (per-head balanced counts when grouped)."""
        if layer.groups == 1:
            counts = torch.tensor([int(k)])
        else:
            # Per-head target: the total split evenly, minus what each head already holds (regrowth).
            counts = split_count(int(k) + (int(base.sum()) if base is not None else 0), layer.groups)
            if base is not None:
                counts = counts - layer.to_groups(base).sum(1).cpu()
            counts = counts.clamp_min(0)
        chosen, filled = select_mask(
            layer.to_groups(scores), counts, layer.to_groups(candidates), mode, temperature, gen
        )
        return layer.from_groups(chosen), filled

    @torch.no_grad()
    def _install(self, layer: SparseLayer, new_mask: torch.Tensor, grown: torch.Tensor) -> None:
        """New mask on the layer; removed and new links at weight 0 with zero optimizer moments.

        ``new_mask`` and ``grown`` are whole (out, in) matrices; under FSDP2 each rank writes its shard.
        """
        layer.set_mask(new_mask)
        keep_state = new_mask & ~grown  # grown includes links removed and regrown in this update
        keep_param = (keep_state.T if layer.transposed else keep_state).contiguous()
        if layer.sharded:
            keep_param = shard_like(keep_param, layer.weight)
        weight = local(layer.weight.data)
        # every grown link starts at 0, also one removed and regrown in this update (it keeps no old weight)
        weight.masked_fill_(~keep_param.to(weight.device), 0)
        if self.optimizer is not None:
            mask_state_(self.optimizer, layer.weight, keep_param)

    # ------------------------------------------------------------------ reporting
    def metrics(self) -> dict[str, float]:
        """Density per layer and overall (sparse subset and whole model), active-neuron fractions."""
        out: dict[str, float] = {}
        links = numel = 0
        active_out = []
        for layer in self.layers:
            mask = layer.mask  # gathered once under FSDP2
            n = int(mask.sum())
            links += n
            numel += mask.numel()
            out[f"chtss/density/{layer.name}"] = n / mask.numel()
            a_out, a_in = active_neurons(mask)
            out[f"chtss/active_out/{layer.name}"] = a_out
            active_out.append(a_out)
        total_params = sum(p.numel() for p in self.model.parameters())
        out["chtss/density_sparse_subset"] = links / max(1, numel)
        out["chtss/density_model"] = (total_params - numel + links) / max(1, total_params)
        out["chtss/active_neurons_mean"] = sum(active_out) / max(1, len(active_out))
        return out

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """{module name: (out, in) bool mask}."""
        return {layer.name: layer.mask for layer in self.layers}

    def save_masks(self, folder) -> None:
        """Masks for a model saved with ``save_pretrained`` (restore with ``chts.load_masks``/``apply_masks``)."""
        save_masks(folder, {k: v.cpu() for k, v in self.masks.items()}, {"config": self.config.to_dict()})

    # ------------------------------------------------------------------ state
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta): bit-packed masks + step, schedule, RNG seed and re-warm-up state."""
        tensors = {layer.name: pack_mask(layer.mask) for layer in self.layers}
        meta = {
            "shapes": {layer.name: list(layer.shape) for layer in self.layers},
            "step_count": self.global_step,
            "total_steps": self.total_steps,
            "seed": self.config.seed,  # every draw is seeded_generator(seed, phase, update, layer)
            "config": self.config.to_dict(),
            "rewarmup": self.rewarmup.state_dict() if self.rewarmup is not None else None,
            "last_metrics": self.last_metrics,
        }
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
        missing = [layer.name for layer in self.layers if layer.name not in tensors]
        if missing:
            raise ValueError(
                f"checkpoint has no CHTss mask for {missing[:5]}: was it written with other targets?"
            )
        masks = [unpack_mask(tensors[layer.name], tuple(meta["shapes"][layer.name])) for layer in self.layers]
        if check_weights:
            outside = {  # whole weights (gathered one at a time under FSDP2): every rank decides alike
                layer.name: int(((layer.full_weight() != 0) & ~mask.to(local(layer.weight).device)).sum())
                for layer, mask in zip(self.layers, masks)
            }
            bad = {name: n for name, n in outside.items() if n}
            if bad:
                raise ValueError(
                    f"the resumed weights have non-zero entries outside the checkpoint's CHTss masks "
                    f"({sum(bad.values())} in {len(bad)} matrices, e.g. {dict(list(bad.items())[:3])}): the masks "
                    "were written by another run or step than the weights. Resume from one complete checkpoint folder."
                )
        for layer, mask in zip(self.layers, masks):
            layer.set_mask(mask)
        self.global_step = int(meta["step_count"])
        if meta.get("total_steps") is not None and self.total_steps is None:
            self.total_steps = int(meta["total_steps"])
        if meta.get("rewarmup") and self.rewarmup is not None:
            self.rewarmup.load_state_dict(meta["rewarmup"])
        self.last_metrics = dict(meta.get("last_metrics") or {})
        self.apply_masks_()
        self._arm_gradient_collection()

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self.state_dict()

    def restore_state(
        self, tensors: dict[str, torch.Tensor], meta: dict, check_weights: bool = False
    ) -> None:
        self.load_state_dict(tensors, meta, check_weights=check_weights)

    def remove(self) -> None:
        """Detach the gradient hooks and the LR re-warm-up (masks stay applied)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self.rewarmup is not None:
            self.rewarmup.remove()
            self.rewarmup = None


CHTssScheduler = CHTssController  # the name before the controller protocol
