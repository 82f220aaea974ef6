"""What a CHTss run reports: whole-model and per-layer metrics, and the few the console shows.

Every update's metrics (``CHTssController.update``) hold per-layer entries (``chtss/density/<layer>``,
``chtss/active_out/<layer>``) and whole-model ones. The Trainer console gets :data:`CONSOLE_KEYS`
only; everything goes to the trackers of ``report_to`` and to ``output_dir/chtss_metrics.json``
(:class:`leanformers.chts.CHTssCallback`).
"""

from __future__ import annotations

from torch import nn

from leanformers.chts.masks import SparseLayer, active_neurons

__all__ = ["CONSOLE_KEYS", "console_metrics", "layer_metrics"]

# mean density of the sparse subset, links removed / regrown by the update, its wall time
CONSOLE_KEYS = ("chtss/density", "chtss/removed", "chtss/regrown", "chtss/update_ms")


def layer_metrics(layers: list[SparseLayer], model: nn.Module) -> dict[str, float]:
    """Density per layer and overall (sparse subset and whole model), active-output-neuron fractions.

    Under FSDP2 every mask is gathered once (a collective: every rank calls it).
    """
    out: dict[str, float] = {}
    links = numel = 0
    active_out = []
    for layer in layers:
        mask = layer.mask
        n = int(mask.sum())
        links += n
        numel += mask.numel()
        out[f"chtss/density/{layer.name}"] = n / mask.numel()
        a_out, _ = active_neurons(mask)
        out[f"chtss/active_out/{layer.name}"] = a_out
        active_out.append(a_out)
    total_params = sum(p.numel() for p in model.parameters())
    out["chtss/density"] = out["chtss/density_sparse_subset"] = links / max(1, numel)
    out["chtss/density_model"] = (total_params - numel + links) / max(1, total_params)
    out["chtss/active_neurons_mean"] = sum(active_out) / max(1, len(active_out))
    return out


def console_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The entries of ``metrics`` the Trainer console shows (:data:`CONSOLE_KEYS`, when present)."""
    return {k: metrics[k] for k in CONSOLE_KEYS if k in metrics}
