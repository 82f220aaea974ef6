"""One topology update's link surgery: prune and remove links, regrow, install the new masks.

The rules come from the registries of :mod:`leanformers.chts.predictors` (``REMOVAL_SCORES``,
``REGROWTH_PREDICTORS``); the draws from seeded generators, so that every rank (and a resumed run)
picks the same links. Whole (out, in) masks and weights are handled one matrix at a time (gathered
under FSDP2).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from leanformers.chts.gradients import GradientCapture
from leanformers.chts.masks import SparseLayer, split_count
from leanformers.chts.predictors import REGROWTH_PREDICTORS, REMOVAL_SCORES
from leanformers.chts.sampling import select_mask
from leanformers.training.distributed import agree_with_rank0, is_distributed, seeded_generator
from leanformers.training.fsdp import local, shard_like
from leanformers.training.optim import mask_state_

__all__ = ["Rewiring", "install", "select"]


def select(
    layer: SparseLayer, scores, k, candidates, mode, temperature, gen, base=None
) -> tuple[torch.Tensor, int]:
    """Exactly ``k`` entries of a (out, in) matrix, balanced over the layer's head groups.

    ``base``: links the layer keeps (regrowth): each head is topped up to an even share of
    ``k + base`` links. Returns ``(chosen (out, in) bool, entries filled uniformly)``.
    """
    if layer.groups == 1:
        counts = torch.tensor([int(k)])
    else:
        counts = split_count(int(k) + (int(base.sum()) if base is not None else 0), layer.groups)
        if base is not None:
            counts = counts - layer.to_groups(base).sum(1).cpu()
        counts = counts.clamp_min(0)
    chosen, filled = select_mask(
        layer.to_groups(scores), counts, layer.to_groups(candidates), mode, temperature, gen
    )
    return layer.from_groups(chosen), filled


@torch.no_grad()
def install(layer: SparseLayer, new_mask: torch.Tensor, grown: torch.Tensor, optimizer=None) -> None:
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
    if optimizer is not None:
        mask_state_(optimizer, layer.weight, keep_param)


class Rewiring:
    """Removal and regrowth of one update over ``layers`` under ``config`` (a CHTssConfig)."""

    def __init__(self, layers: list[SparseLayer], config: Any, gradients: GradientCapture):
        self.layers = layers
        self.config = config
        self.gradients = gradients

    def _generator(self, phase: str, u: int, idx: int) -> torch.Generator:
        device = local(self.layers[idx].weight).device
        return seeded_generator(self.config.seed, phase, u, idx, device=device)

    def remove(
        self, u: int, targets: list[int], zeta: float, temperature: float, keeps: list[int] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer ``(kept, removed)`` links after pruning to the target and the soft removal.

        1. CHTss: hard prune to the scheduled target by ``prune_score``; 2. remove a fraction zeta of
        the active links by ``removal`` (sampled ``removal_sampling``). ``keeps`` (EM_S schedule):
        links to keep per layer instead of pruning and removing a fraction zeta.
        """
        cfg = self.config
        removal = REMOVAL_SCORES[cfg.removal]
        kept: list[torch.Tensor] = []
        removed: list[torch.Tensor] = []
        for idx, (layer, target) in enumerate(zip(self.layers, targets)):
            gen = self._generator("remove", u, idx)
            mask = current = layer.mask  # whole matrices, one at a time (gathered under FSDP2)
            w = layer.full_weight()
            if keeps is None and int(mask.sum()) > target:
                score = REMOVAL_SCORES[cfg.prune_score].score(w, mask, None, cfg.mest_lambda)
                mask, _ = select(layer, score, target, mask, "hard", 1.0, gen)
            n_active = int(mask.sum())
            n_keep = n_active - int(round(zeta * n_active)) if keeps is None else min(n_active, keeps[idx])
            grad = self.gradients.dense(idx) if removal.needs_gradient else None
            score = removal.score(w, mask, grad, cfg.mest_lambda)
            keep, _ = select(layer, score, n_keep, mask, cfg.removal_sampling, temperature, gen)
            kept.append(keep)
            removed.append(current & ~keep)
            del w
        return kept, removed

    def _batches(self, kept: list[torch.Tensor]) -> list[list[int]]:
        """Layer indices scored together: same-shape matrices (at most ``predictor_batch``) for batched rules."""
        if not REGROWTH_PREDICTORS[self.config.regrowth].batched:
            return [[idx] for idx in range(len(kept))]
        by_shape: dict[tuple, list[int]] = {}
        for idx, m in enumerate(kept):
            by_shape.setdefault((tuple(m.shape), m.device), []).append(idx)
        size = self.config.predictor_batch
        return [same[b0 : b0 + size] for same in by_shape.values() for b0 in range(0, len(same), size)]

    def scored_batches(self, kept: list[torch.Tensor], timer: list[float]):
        """Yield lists of (layer index, regrowth scores), one batch at a time.

        Peak memory holds one batch of float32 scores, not the whole model's. Predictor time (ms)
        accumulates in ``timer[0]``.
        """
        rule = REGROWTH_PREDICTORS[self.config.regrowth]
        for idxs in self._batches(kept):
            start = time.perf_counter()
            grads = [self.gradients.dense(i) for i in idxs] if rule.needs_gradient else [None] * len(idxs)
            scores = rule.score(torch.stack([kept[i] for i in idxs]), grads, self.config)
            if kept[idxs[0]].is_cuda:
                torch.cuda.synchronize()
            timer[0] += (time.perf_counter() - start) * 1000.0
            yield [(i, scores[j]) for j, i in enumerate(idxs)]

    def regrow(
        self,
        u: int,
        kept: list[torch.Tensor],
        removed: list[torch.Tensor],
        targets: list[int],
        optimizer=None,
    ) -> dict[str, float]:
        """Regrow every layer to exactly its target among non-links and install the new masks.

        Returns the counts ``filled`` (uniform fills), ``overlap`` (regrown links removed at this update),
        ``grown``, ``disagree`` (links where this rank chose differently from rank 0) and ``predictor_ms``.
        """
        cfg = self.config
        timer = [0.0]
        counts = dict.fromkeys(("filled", "overlap", "grown", "disagree"), 0)
        for batch in self.scored_batches(kept, timer):
            for idx, score in batch:
                layer, base = self.layers[idx], kept[idx]
                n_grow = targets[idx] - int(base.sum())
                gen = self._generator("regrow", u, idx)
                grown, filled = select(layer, score, n_grow, ~base, cfg.regrowth_sampling, 1.0, gen, base)
                new_mask = base | grown
                if is_distributed():  # guard: rank 0's masks win
                    counts["disagree"] += agree_with_rank0(new_mask)
                    grown = new_mask & ~base
                counts["filled"] += filled
                counts["overlap"] += int((grown & removed[idx]).sum())
                counts["grown"] += int(grown.sum())
                install(layer, new_mask, grown, optimizer)
        return {**counts, "predictor_ms": timer[0]}
