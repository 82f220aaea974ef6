"""Linear learning-rate re-warm-up after a reset, on top of whatever schedule the user runs."""

from __future__ import annotations

import torch

from leanformers.training.optim import unwrap_optimizer

__all__ = ["LRRewarmup"]


class LRRewarmup:
    """Scale the learning rate of the next ``num_steps`` optimizer steps by (j + 1) / (num_steps + 1).

    It hooks ``optimizer.step`` (pre: scale, post: restore), so the user's LR scheduler never sees
    the factor and stays in charge of the base schedule. Works under HF Trainer, accelerate and
    custom loops.

    Args:
        optimizer: a torch optimizer (accelerate wrappers are unwrapped).
        param_groups: indices of the groups to re-warm; None means all.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, param_groups: list[int] | None = None):
        self.optimizer = unwrap_optimizer(optimizer)
        self.param_groups = param_groups
        self.num_steps = 0
        self.steps_done = 0
        self._saved: list[float] | None = None
        self._handles = [
            self.optimizer.register_step_pre_hook(self._pre_step),
            self.optimizer.register_step_post_hook(self._post_step),
        ]

    def restart(self, num_steps: int) -> None:
        """Start a new ramp over ``num_steps`` steps (0 disables it)."""
        self.num_steps = int(num_steps)
        self.steps_done = 0

    @property
    def factor(self) -> float:
        if self.steps_done >= self.num_steps:
            return 1.0
        return (self.steps_done + 1) / (self.num_steps + 1)

    def _groups(self):
        groups = self.optimizer.param_groups
        return groups if self.param_groups is None else [groups[i] for i in self.param_groups]

    def _pre_step(self, optimizer, args, kwargs):
        factor = self.factor
        if factor == 1.0:
            self._saved = None
            return
        self._saved = []
        for group in self._groups():
            lr = group["lr"]
            self._saved.append(lr)
            group["lr"] = lr * factor if not isinstance(lr, torch.Tensor) else lr.mul(factor)

    def _post_step(self, optimizer, args, kwargs):
        if self._saved is not None:
            for group, lr in zip(self._groups(), self._saved):
                group["lr"] = lr
            self._saved = None
        if self.steps_done < self.num_steps:
            self.steps_done += 1

    def remove(self) -> None:
        """Detach the hooks from the optimizer."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])
        self.steps_done = int(state["steps_done"])
