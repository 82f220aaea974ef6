"""Link scores of a sparse layer seen as a bipartite graph (pure tensor maths, no model walking).

A mask ``A`` (out x in, bool) links output node o and input node i iff ``A[o, i]``. Regrowth scores
are computed for non-links; removal scores for links.

Cannistraci-Hebb on length-3 paths o - i1 - o1 - i of a candidate (o, i):
- exact, path based (L3p): sum over paths of a product of node terms of i1 and o1, with the internal
  degree di(z) (links from z into the candidate's local community; in a bipartite layer that is the
  number of L3 paths through z) and external degree de(z) = deg(z) - di(z) - 1;
- node based (L3n): each intermediate node of one side contributes once, weighted by its overlap
  with the candidate end node: four GEMMs (A A^T, its product with A, and the same on the input
  side), the GPU approximation of the CHTs paper.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "CH31_FORMULAS",
    "CH_VARIANTS",
    "PRUNE_SCORES",
    "REGROWTH_PREDICTORS",
    "REMOVAL_SCORES",
    "Regrowth",
    "Removal",
    "gradient_scores",
    "l3n_scores",
    "l3p_scores",
    "l3p_scores_dense",
    "mest_scores",
    "random_scores",
    "relative_importance",
    "weight_scores",
]

CH_VARIANTS = ("CH2", "CH3", "CH3.1", "CH3.1_official")
# CH3.1-L3n node factor: ours DD / (1 + E) or the reference LLM code's (CHTssConfig.ch31_formula)
CH31_FORMULAS = ("leanformers", "official")


def _check_mask(mask: torch.Tensor) -> None:
    if mask.dim() not in (2, 3):
        raise ValueError(f"mask must be (out, in) or (batch, out, in); got shape {tuple(mask.shape)}")


def _node_factor(overlap: torch.Tensor, external: torch.Tensor, variant: str) -> torch.Tensor:
    """L3n factor of an intermediate node given its overlap with the end node and its external degree."""
    external = external.clamp_min(0)  # -1 only where the node cannot reach a non-link (harmless there)
    if variant == "CH2":
        factor = (1.0 + overlap) / (1.0 + external)
    elif variant == "CH3":
        factor = 1.0 / (1.0 + external)
    elif variant == "CH3.1":
        # CH3 weighted by the number of L3 paths through the node (see docs/chtss.md).
        factor = overlap / (1.0 + external)
    elif variant == "CH3.1_official":
        # The reference LLM code's CH3.1-L3n: (1 + DD) / (1 + E)^(1 + E / (1 + E)).
        factor = (1.0 + overlap) / (1.0 + external) ** (1.0 + external / (1.0 + external))
    else:
        raise ValueError(f"unknown CH variant {variant!r}; choose one of {CH_VARIANTS}")
    return torch.where(overlap > 0, factor, torch.zeros_like(factor))


@contextlib.contextmanager
def _tf32(enabled: bool):
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@torch.no_grad()
def l3n_scores(
    mask: torch.Tensor, variant: str = "CH2", chunk: int = 4096, allow_tf32: bool = True
) -> torch.Tensor:
    """Node-based CH-L3 scores (CH2-L3n, CH3-L3n, CH3.1-L3n) for every non-link.

    Args:
        mask: (out, in) or (B, out, in) boolean/0-1 masks; a batch holds same-shape layers and is
            scored with batched GEMMs (one kernel per chunk for all of them).
        variant: "CH2", "CH3", "CH3.1" (ours: DD / (1 + E)) or "CH3.1_official" (the reference
            code's (1 + DD) / (1 + E)^(1 + E / (1 + E))).
        chunk: rows of A A^T (and of A^T A) materialised at once: memory O(chunk * max(out, in)).
        allow_tf32: on CUDA, run the GEMMs in TF32 (0/1 products are exact; never bf16/fp16, whose
            8-bit mantissa cannot count above 256).

    Returns:
        float32 scores of the mask's shape, 0 on links and on candidates with no L3 path.
    """
    _check_mask(mask)
    squeeze = mask.dim() == 2
    A = (mask if not squeeze else mask.unsqueeze(0)).to(torch.float32)
    batch, n_out, n_in = A.shape
    deg_out = A.sum(-1)  # (B, out)
    deg_in = A.sum(-2)  # (B, in)
    At = A.transpose(1, 2)
    scores = torch.zeros_like(A)
    with _tf32(allow_tf32):
        # Output-side intermediates o' of a candidate (o, i): overlap DD[o, o'] = |N(o) & N(o')|.
        for r0 in range(0, n_out, chunk):
            r1 = min(r0 + chunk, n_out)
            overlap = torch.bmm(A[:, r0:r1], At)  # (B, c, out)
            factor = _node_factor(overlap, deg_out[:, None, :] - overlap - 1.0, variant)
            rows = torch.arange(r0, r1, device=A.device)
            factor[:, rows - r0, rows] = 0.0  # o' = o is not an intermediate
            scores[:, r0:r1] = torch.bmm(factor, A)
        # Input-side intermediates i' of a candidate (o, i): overlap TT[i, i'] = |N(i) & N(i')|.
        for c0 in range(0, n_in, chunk):
            c1 = min(c0 + chunk, n_in)
            overlap = torch.bmm(At[:, c0:c1], A)  # (B, c, in)
            factor = _node_factor(overlap, deg_in[:, None, :] - overlap - 1.0, variant)
            cols = torch.arange(c0, c1, device=A.device)
            factor[:, cols - c0, cols] = 0.0
            scores[:, :, c0:c1] += torch.bmm(factor, At).transpose(1, 2)
    scores.mul_(1.0 - A)
    return scores[0] if squeeze else scores


def _l3p_term(di: torch.Tensor, deg: torch.Tensor, variant: str) -> torch.Tensor:
    """Node term t(z) of an exact L3p path from the node's internal degree and degree (float64)."""
    de = (deg - di - 1.0).clamp_min(0)
    if variant == "CH2":
        return torch.sqrt((1.0 + di) / (1.0 + de))
    if variant == "CH3.1":
        return 1.0 / torch.sqrt(de + 1.0 / (1.0 + di))
    return 1.0 / torch.sqrt(1.0 + de)


def _expand(nodes: torch.Tensor, ptr: torch.Tensor, neighbours: torch.Tensor):
    """CSR expansion: (index into ``nodes``, neighbour) for every neighbour of every node."""
    counts = ptr[nodes + 1] - ptr[nodes]
    item = torch.repeat_interleave(torch.arange(len(nodes), device=nodes.device), counts)
    first = torch.cumsum(counts, 0) - counts
    offset = torch.arange(len(item), device=nodes.device) - first[item]
    return item, neighbours[ptr[nodes][item] + offset]


@torch.no_grad()
def l3p_scores(mask: torch.Tensor, variant: str = "CH2", max_paths: int = 1 << 21) -> torch.Tensor:
    """Exact path-based CH2-L3 / CH3-L3 / CH3.1-L3 scores of every non-link of one (out, in) mask.

    Same definition as :func:`l3p_scores_dense`, computed by enumerating the L3 paths
    o - i1 - o1 - i of the sparse graph (at most ``max_paths`` at a time): cost O(N d^3), the
    complexity of CHT, so it is practical for ultra-sparse layers (the MLP at 1 %: ~6 M paths per
    1568 x 1568 matrix) and not for dense ones. Memory: A A^T and A^T A (out^2 + in^2 float64).
    """
    if mask.dim() != 2:
        raise ValueError(f"l3p_scores takes one (out, in) mask; got shape {tuple(mask.shape)}")
    if variant not in ("CH2", "CH3", "CH3.1"):
        raise ValueError(f"exact L3p supports CH2, CH3 and CH3.1, not {variant!r}")
    A = mask.bool()
    n_out, n_in = A.shape
    dev = A.device
    Af = A.to(torch.float64)
    DD = Af @ Af.T  # DD[o1, o] = |N(o1) & N(o)|: L3 paths through o1 for a candidate ending at o
    TT = Af.T @ Af
    deg_out, deg_in = Af.sum(1), Af.sum(0)
    eo, ei = torch.nonzero(A, as_tuple=True)  # edges sorted by output: CSR of A
    row_ptr = torch.zeros(n_out + 1, dtype=torch.long, device=dev)
    row_ptr[1:] = torch.cumsum(torch.bincount(eo, minlength=n_out), 0)
    ti, to = torch.nonzero(A.T, as_tuple=True)  # CSR of A^T: outputs of each input
    col_ptr = torch.zeros(n_in + 1, dtype=torch.long, device=dev)
    col_ptr[1:] = torch.cumsum(torch.bincount(ti, minlength=n_in), 0)
    # Paths starting with edge (o, i1): sum over o1 in N(i1) of deg(o1); chunk the edges by it.
    per_edge = (Af.T @ deg_out)[ei].to(torch.long)
    ends = torch.cumsum(per_edge, 0)
    scores = torch.zeros(n_out * n_in, dtype=torch.float64, device=dev)
    start, n_edges = 0, len(eo)
    while start < n_edges:
        base = int(ends[start - 1]) if start else 0
        stop = int(torch.searchsorted(ends, base + max_paths, right=True))
        stop = max(stop, start + 1)
        o_e, i1_e = eo[start:stop], ei[start:stop]
        start = stop
        r1, o1 = _expand(i1_e, col_ptr, to)  # 2-paths o - i1 - o1
        o_t, i1_t = o_e[r1], i1_e[r1]
        keep = o1 != o_t
        o_t, i1_t, o1 = o_t[keep], i1_t[keep], o1[keep]
        r2, i = _expand(o1, row_ptr, ei)  # 3-paths o - i1 - o1 - i
        o_p, i1_p, o1_p = o_t[r2], i1_t[r2], o1[r2]
        keep = ~A[o_p, i]  # candidates only (also drops i == i1)
        o_p, i1_p, o1_p, i = o_p[keep], i1_p[keep], o1_p[keep], i[keep]
        contrib = _l3p_term(TT[i1_p, i], deg_in[i1_p], variant) * _l3p_term(
            DD[o1_p, o_p], deg_out[o1_p], variant
        )
        scores.index_add_(0, o_p * n_in + i, contrib)
    return scores.view(n_out, n_in).to(torch.float32)


@torch.no_grad()
def l3p_scores_dense(mask: torch.Tensor, variant: str = "CH2", chunk: int = 64) -> torch.Tensor:
    """Exact path-based CH2-L3 / CH3-L3 / CH3.1-L3 scores of every non-link of one (out, in) mask.

    score[o, i] = sum over paths o - i1 - o1 - i of t(i1) t(o1) with
    CH2: t(z) = sqrt((1 + di(z)) / (1 + de(z))), CH3: t(z) = 1 / sqrt(1 + de(z)),
    CH3.1: t(z) = 1 / sqrt(de(z) + 1 / (1 + di(z))) (the reference C++ code's model 5),
    di(i1) = |N(i1) & N(i)|, di(o1) = |N(o1) & N(o)| (the L3 paths through the node) and
    de(z) = deg(z) - di(z) - 1. Dense tensor algebra, cost O(out^2 in^2), memory O(chunk in^2): for
    small layers and as the oracle of :func:`l3p_scores` and of the L3n approximation.
    """
    if mask.dim() != 2:
        raise ValueError(f"l3p_scores takes one (out, in) mask; got shape {tuple(mask.shape)}")
    if variant not in ("CH2", "CH3", "CH3.1"):
        raise ValueError(f"exact L3p supports CH2, CH3 and CH3.1, not {variant!r}")
    A = mask.to(torch.float64)
    n_out, n_in = A.shape
    DD = A @ A.T  # (out, out): DD[o1, o] = paths o - * - o1
    TT = A.T @ A  # (in, in)
    deg_out = A.sum(1)
    deg_in = A.sum(0)

    t_in = _l3p_term(TT, deg_in[:, None], variant)  # [i1, i] term of i1 for candidate end i
    t_out = _l3p_term(DD, deg_out[:, None], variant)  # [o1, o] term of o1 for candidate end o
    scores = torch.zeros_like(A)
    for o0 in range(0, n_out, chunk):
        o1_ = min(o0 + chunk, n_out)
        # M[c, i1, i] = sum_o1 A[o1, i1] t_out[o1, o] A[o1, i]
        weighted = A[None, :, :] * t_out[:, o0:o1_].T[:, :, None]  # (c, out, in)
        M = torch.einsum("coa,ob->cab", weighted, A)  # (c, in, in)
        scores[o0:o1_] = torch.einsum("ca,ab,cab->cb", A[o0:o1_], t_in, M)
    scores.mul_(1.0 - A)
    return scores.to(torch.float32)


def weight_scores(weight: torch.Tensor) -> torch.Tensor:
    """|w| in float32 (removal by magnitude)."""
    return weight.detach().abs().to(torch.float32)


def relative_importance(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """RI = |w| / colsum|w| + |w| / rowsum|w| of a (out, in) (or batched) weight, float32.

    A link that matters for either of its end nodes scores high even when its magnitude is small in
    absolute terms; dividing by the node strength makes the scores comparable across nodes.
    """
    w = weight.detach().abs().to(torch.float32)
    if mask is not None:
        w = w * mask.to(w.dtype)
    col = w.sum(-2, keepdim=True)  # strength of each input node
    row = w.sum(-1, keepdim=True)  # strength of each output node
    tiny = torch.finfo(torch.float32).tiny
    return w / col.clamp_min(tiny) + w / row.clamp_min(tiny)


def mest_scores(weight: torch.Tensor, grad: torch.Tensor | None, lam: float = 1.0) -> torch.Tensor:
    """MEST removal score |w| + lambda |grad| (|w| when no gradient is available)."""
    score = weight_scores(weight)
    if grad is not None:
        score = score + lam * grad.detach().abs().to(torch.float32)
    return score


def gradient_scores(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RigL regrowth score: |dense gradient| on non-links (0 on links)."""
    return grad.detach().abs().to(torch.float32) * (~mask.bool()).to(torch.float32)


def random_scores(mask: torch.Tensor) -> torch.Tensor:
    """SET regrowth score: 1 on every non-link (uniform sampling), 0 on links."""
    return (~mask.bool()).to(torch.float32)


# ----------------------------------------------------------------------------- registries
# The config's ``regrowth`` / ``removal`` / ``prune_score`` values are keys of these tables (CHTssConfig
# validates against them). A new rule is one entry here, next to its score function.


@dataclass(frozen=True)
class Regrowth:
    """A regrowth rule: scores of the non-links of a batch of same-shape kept masks.

    Attributes:
        score: ``score(kept, grads, settings) -> (B, out, in)`` float32 scores, 0 on links. ``kept``:
            (B, out, in) bool; ``grads``: the B dense (out, in) gradients (None where none reached a
            matrix; only filled for rules that need them); ``settings``: an object with
            ``predictor_chunk``, ``allow_tf32`` and ``ch31_formula`` (a CHTssConfig).
        batched: same-shape matrices may be scored in one call (B > 1).
        needs_gradient: the dense gradient of the update step is collected for it.
    """

    score: Callable
    batched: bool = False
    needs_gradient: bool = False


def _l3n_rule(variant: str) -> Regrowth:
    def score(kept, grads, settings):
        name = "CH3.1_official" if variant == "CH3.1" and settings.ch31_formula == "official" else variant
        return l3n_scores(kept, name, settings.predictor_chunk, settings.allow_tf32)

    return Regrowth(score, batched=True)


def _l3p_rule(variant: str) -> Regrowth:
    def score(kept, grads, settings):
        return torch.stack([l3p_scores(mask, variant) for mask in kept])

    return Regrowth(score)


def _gradient_rule(kept, grads, settings):
    return torch.stack(
        [
            gradient_scores(g, m) if g is not None else torch.zeros(m.shape, device=m.device)
            for m, g in zip(kept, grads)
        ]
    )


REGROWTH_PREDICTORS: dict[str, Regrowth] = {
    **{f"{v}_L3n": _l3n_rule(v) for v in ("CH2", "CH3", "CH3.1")},  # node based, four GEMMs
    **{f"{v}_L3p": _l3p_rule(v) for v in ("CH2", "CH3", "CH3.1")},  # exact, path based: sparse layers
    "random": Regrowth(lambda kept, grads, settings: random_scores(kept)),  # SET
    "gradient": Regrowth(_gradient_rule, needs_gradient=True),  # RigL
}


@dataclass(frozen=True)
class Removal:
    """A removal score of the active links.

    Attributes:
        score: ``score(weight, mask, grad, mest_lambda) -> (out, in)`` float32 (weight and mask whole
            (out, in) matrices; grad the dense gradient or None).
        needs_gradient: the dense gradient of the update step is collected for it.
    """

    score: Callable
    needs_gradient: bool = False


REMOVAL_SCORES: dict[str, Removal] = {
    "weight": Removal(lambda w, mask, grad, lam: weight_scores(w)),
    "ri": Removal(lambda w, mask, grad, lam: relative_importance(w, mask)),
    "mest": Removal(lambda w, mask, grad, lam: mest_scores(w, grad, lam), needs_gradient=True),
}
# CHTss's hard pruning to the scheduled density: the gradient-free removal scores.
PRUNE_SCORES = tuple(name for name, rule in REMOVAL_SCORES.items() if not rule.needs_gradient)
