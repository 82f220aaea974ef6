"""Configuration of CHTs / CHTss dynamic sparse training (and the SET / RigL / CHT baselines)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

from leanformers.chts.initial import INIT_TOPOLOGIES, LAYER_DENSITIES
from leanformers.chts.predictors import CH31_FORMULAS, PRUNE_SCORES, REGROWTH_PREDICTORS, REMOVAL_SCORES
from leanformers.chts.sampling import SAMPLING_MODES
from leanformers.chts.schedules import DENSITY_SCHEDULES, SCHEDULE_CLOCKS, ZETA_SCHEDULES
from leanformers.chts.topology import BRF_DEGREE_KINDS, SPARSE_INIT_FANS

__all__ = ["DEFAULT_TARGETS", "CHTssConfig", "METHOD_PRESETS", "OFFICIAL_PRESETS"]

# Decoder-block projections (LLaMA, Qwen2, Mistral, ...); embeddings, norms and lm_head stay dense.
DEFAULT_TARGETS = (r"(^|\.)(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",)

# field -> its valid values: the keys of the registry that implements the choice
CHOICES = {
    "regrowth": tuple(REGROWTH_PREDICTORS),
    "regrowth_sampling": SAMPLING_MODES,
    "removal": tuple(REMOVAL_SCORES),
    "removal_sampling": SAMPLING_MODES,
    "prune_score": PRUNE_SCORES,
    "ch31_formula": CH31_FORMULAS,
    "density_schedule": tuple(DENSITY_SCHEDULES),
    "zeta_schedule": tuple(ZETA_SCHEDULES),
    "schedule_clock": SCHEDULE_CLOCKS,
    "init_topology": tuple(INIT_TOPOLOGIES),
    "layer_density": tuple(LAYER_DENSITIES),
    "brf_degrees": BRF_DEGREE_KINDS,
    "sparse_init_fan": SPARSE_INIT_FANS,
}

# Named methods of the benchmark (BENCHMARKS.md §5): field overrides applied by CHTssConfig.for_method.
METHOD_PRESETS: dict[str, dict] = {
    # CHTss: soft removal + soft CH regrowth + sigmoid density decay from initial_density (0.5).
    "chtss": {"regrowth": "CH2_L3n", "regrowth_sampling": "soft", "removal_sampling": "soft"},
    # CHTs: the soft rule at fixed density.
    "chts": {
        "regrowth": "CH2_L3n",
        "regrowth_sampling": "soft",
        "removal_sampling": "soft",
        "initial_density": None,
    },
    # CHT (ICLR 2024): hard magnitude removal, hard top-k regrowth by the exact path-based CH3-L3p
    # (the reference's CH_scores_new_v2, L3 paths, model CH3), fixed density. O(N d^3): ultra-sparse
    # layers only (the MLP at 1 %); LLM-sized layers at 30 % use `cht_l3n`.
    "cht": {
        "regrowth": "CH3_L3p",
        "regrowth_sampling": "hard",
        "removal_sampling": "hard",
        "initial_density": None,
    },
    # CHT's rule with the GPU-friendly node-based CH3-L3n approximation (four GEMMs at any density).
    "cht_l3n": {
        "regrowth": "CH3_L3n",
        "regrowth_sampling": "hard",
        "removal_sampling": "hard",
        "initial_density": None,
    },
    # SET: magnitude removal, uniform random regrowth.
    "set": {"regrowth": "random", "removal_sampling": "hard", "initial_density": None},
    # RigL: magnitude removal, regrowth by |dense gradient| (hard top-k).
    "rigl": {
        "regrowth": "gradient",
        "regrowth_sampling": "hard",
        "removal_sampling": "hard",
        "initial_density": None,
    },
    # Static sparse: the initial random topology is never rewired.
    "static": {"update_interval": 0, "initial_density": None},
}

# The reference implementations' configurations (docs/chtss.md lists every difference and why the
# presets above differ). Official LLM runs (soft-rule repository README, LLaMA on C4): CH2_L3n_soft
# regrowth, which the code applies as top-k; soft |w| removal with T 1 -> 9 and zeta 0.1, both
# evaluated at step / T_end; BRF init r = 0.3 with random degrees; 10-step LR re-warm-up.
_OFFICIAL_LLM = {
    "regrowth": "CH2_L3n",
    "regrowth_sampling": "hard",
    "removal": "weight",
    "removal_sampling": "soft",
    "zeta": 0.1,
    "zeta_schedule": "cosine",
    "temperature_start": 1.0,
    "temperature_end": 9.0,
    "schedule_clock": "step",
    "update_interval": 100,
    "topology_end": 0.75,
    "init_topology": "brf",
    "brf_randomness": 0.3,
    "brf_degrees": "random",
    "rewarmup_steps": 10,
    "chain_removal": False,
    "mest_lambda": 0.01,
}
# Official MLP runs (main repository README, EMNIST/MNIST MLP at 99 % sparsity): correlated sparse
# init (input correlation tiled, --dim 2), swi weight init, chain removal, hard |w| removal, update
# every epoch until 75 % of training.
_OFFICIAL_MLP = {
    "removal": "weight",
    "removal_sampling": "hard",
    "zeta": 0.3,
    "temperature_end": 3.0,
    "schedule_clock": "step",
    "topology_end": 0.75,
    "init_topology": "correlated",
    "sparse_init": True,
    "sparse_init_fan": "out",
    "chain_removal": True,
    "mest_lambda": 0.01,
}
OFFICIAL_PRESETS: dict[str, dict] = {
    # CHTss of the README: sigmoid decay from 50 % by RI pruning over the first 8000 of 10000 steps
    # (density_end 0.8 > topology_end 0.75: the final density is NOT reached, as in the reference).
    "chtss_official_llm": {
        **_OFFICIAL_LLM,
        "initial_density": 0.5,
        "density_schedule": "sigmoid",
        "sigmoid_k": 6.0,
        "prune_score": "ri",
        "density_end": 0.8,
    },
    # CHTs of the README at fixed density.
    "chts_official_llm": {**_OFFICIAL_LLM, "initial_density": None},
    # CHTs MLP command: CH3_L3p_soft regrowth (sampled, T = 1) with the EM_S density schedule
    # (final + 5 % until 60 % of the window, + 2.5 % until its last update, then final).
    "chts_official_mlp": {
        **_OFFICIAL_MLP,
        "regrowth": "CH3_L3p",
        "regrowth_sampling": "soft",
        "density_schedule": "em_s",
        "em_s_boost": 0.05,
        "initial_density": None,
    },
    # CHT MLP command (ICLR 2024): exact CH3_L3p top-k regrowth, cosine zeta 0.3 ("adaptive_zeta").
    # Its layer early stop (--early_stop) is not implemented (docs/chtss.md).
    "cht_official": {
        **_OFFICIAL_MLP,
        "regrowth": "CH3_L3p",
        "regrowth_sampling": "hard",
        "zeta_schedule": "cosine",
        "initial_density": None,
    },
}
METHOD_PRESETS.update(OFFICIAL_PRESETS)


@dataclass
class CHTssConfig:
    """Everything a CHTss / CHTs run needs. ``initial_density == final_density`` gives CHTs.

    Densities are fractions of kept links per targeted matrix (or, with ``layer_density="erk"``,
    of the whole sparse subset). Steps are optimizer steps (gradient accumulation counted once).

    Args:
        final_density: density at the end of the pruning window, in (0, 1].
        initial_density: density of the initial topology; ``None`` means ``final_density`` (CHTs).
            CHTss decays from it to ``final_density`` with ``density_schedule``.
        targets: regular expressions matched (``re.search``) against module names of ``nn.Linear``
            (or GPT-2 ``Conv1D``) modules; the default picks q/k/v/o/gate/up/down projections.
        exclude: regular expressions of module names never made sparse.
        update_interval: optimizer steps between two topology updates (0: static sparse training), or
            "auto" (default): derived from the run length, ``min(100, max(1, floor(topology_end *
            total_steps) // 10))``: the reference recipes' 100 on long runs, at least 10 updates on
            short ones (100 steps: every 7). The chosen value is logged, and kept on resume.
        topology_end: fraction of training after which the masks are frozen.
        total_steps: optimizer steps of the run; the Trainer callback fills it from ``max_steps``.
        regrowth: link predictor for regrowth: CH2_L3n (default), CH3_L3n, CH3.1_L3n (node based,
            GPU friendly), CH2_L3p / CH3_L3p (exact path based, small layers only), random (SET),
            gradient (RigL).
        regrowth_sampling: "soft" samples proportional to the score, "hard" takes the top-k.
        removal: link score for removal: "weight" (|w|), "ri" (relative importance), "mest"
            (|w| + mest_lambda |grad|, the gradient averaged over data-parallel ranks).
        mest_lambda: MEST's gradient weight; 0.01 as in the official code (its ``--factor``).
        removal_sampling: "soft" keeps links sampled proportional to score**T, "hard" keeps the top-k.
        zeta: fraction of active links removed at the first update; decays to 0 at topology_end
            with ``zeta_schedule`` (0.3 for MLPs, 0.1 for LLMs in the references).
        temperature_start / temperature_end: the soft-removal temperature T ramps linearly.
        density_schedule: "sigmoid" (CHTss, steepness ``sigmoid_k``), "linear", "cubic", or "em_s"
            (the reference MLP CHTs schedule: start at final + ``em_s_boost``; every update prunes to
            ``final_density`` by the removal score (zeta unused) and regrows to final + em_s_boost
            until 60 % of the window, final + em_s_boost / 2 until its last update, then final).
        em_s_boost: density above the final one that EM_S regrows to (0.05 in the reference).
        density_end: fraction of training over which the density decays (None: ``topology_end``,
            so that the final density is reached exactly). Larger than ``topology_end`` reproduces
            the reference CHTss recipe, which never reaches its final density.
        schedule_clock: "update" (default) evaluates zeta at (u - 1) / U and T at (u - 1) / (U - 1)
            over the U updates; "step" evaluates both at s / T_end with s the update's optimizer
            step and T_end = topology_end * total_steps, as the reference code does.
        prune_score: score of the CHTss density pruning (hard top-k): "ri" or "weight".
        chain_removal: drop links of neurons left without inputs or outputs (MLP / SwiGLU aware).
        init_topology: "er" (uniform random), "erk" (alias of er with ERK layer densities), "brf", or
            "correlated" (CSTI: top |input correlation| tiled over each matrix; the scheduler needs
            ``input_correlation``).
        layer_density: "uniform" (every matrix at the same density) or "erk" (Erdos-Renyi-Kernel).
        brf_randomness: r in [0, 1] of the bipartite receptive field (0: nearest neighbours, 1: ER).
        brf_degrees: "fixed" (equal degrees of the small-side nodes) or "random" (1 link each, the rest
            assigned to uniformly random nodes: the reference ``--degree_dist uniform``).
        sparse_init: re-draw targeted weights with std sqrt(2 / (density * fan)).
        sparse_init_fan: "in" (in_features, default) or "out" (out_features: the reference ``swi``).
        ch31_formula: CH3.1_L3n node factor: "leanformers" DD / (1 + E) or "official"
            (1 + DD) / (1 + E)^(1 + E / (1 + E)) of the reference LLM code.
        rewarmup_steps: linear LR re-warm-up over this many steps after each update (0: off).
        balance_heads: give every attention head (q/k/v rows, o columns; GQA aware) equal links.
        predictor_chunk: rows of A A^T / A^T A computed at once by the L3n predictor.
        predictor_batch: at most this many same-shape matrices per batched predictor call (memory).
        allow_tf32: let the L3n GEMMs use TF32 on CUDA (never bf16/fp16).
        seed: seed of every random draw (initial masks, sampling); all ranks agree through it.
        masks_from_model: a model loaded with ``from_pretrained(dir)`` whose ``dir`` holds CHTss masks
            (written by ``save_pretrained`` under a controller) starts from them instead of a new
            draw; the run then starts at their density (between final and initial density).
        method: a named preset (``chtss``, ``chts``, ``cht``, ``cht_l3n``, ``set``, ``rigl``, ``static``): the fields
            of :data:`METHOD_PRESETS` that are not passed explicitly take the preset's values, so
            ``CHTssConfig(method="rigl")`` is RigL (same as ``CHTssConfig.for_method("rigl")``).
    """

    final_density: float = 0.3
    initial_density: float | None = 0.5
    targets: tuple[str, ...] | list[str] | str = DEFAULT_TARGETS
    exclude: tuple[str, ...] | list[str] | str = (r"lm_head", r"embed")
    update_interval: int | str = "auto"
    topology_end: float = 0.75
    total_steps: int | None = None
    regrowth: str = "CH2_L3n"
    regrowth_sampling: str = "soft"
    removal: str = "weight"
    removal_sampling: str = "soft"
    mest_lambda: float = 0.01
    zeta: float = 0.1
    zeta_schedule: str = "cosine"
    temperature_start: float = 1.0
    temperature_end: float = 9.0
    density_schedule: str = "sigmoid"
    sigmoid_k: float = 6.0
    prune_score: str = "ri"
    chain_removal: bool = False
    init_topology: str = "er"
    layer_density: str = "uniform"
    brf_randomness: float = 0.25
    brf_degrees: str = "fixed"
    sparse_init: bool = False
    sparse_init_fan: str = "in"
    ch31_formula: str = "leanformers"
    schedule_clock: str = "update"
    density_end: float | None = None
    em_s_boost: float = 0.05
    rewarmup_steps: int = 0
    balance_heads: bool = False
    predictor_chunk: int = 4096
    predictor_batch: int = 16
    allow_tf32: bool = True
    seed: int = 0
    masks_from_model: bool = True
    method: str = field(default="chtss")

    def __new__(cls, *args, **kwargs):
        # Remember which fields the caller gave, so that ``method`` fills only the others with its
        # preset (a dataclass cannot tell an explicit value from a default once __init__ has run).
        self = super().__new__(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        object.__setattr__(self, "_explicit_fields", frozenset(names[: len(args)]) | frozenset(kwargs))
        return self

    def __post_init__(self) -> None:
        self._apply_method_preset()
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.targets = tuple(self.targets)
        self.exclude = tuple(self.exclude)
        if self.density_schedule == "em_s":
            self._validate_em_s()
            start = self.final_density + self.em_s_boost
            if self.initial_density is None:
                self.initial_density = start
            elif abs(float(self.initial_density) - start) > 1e-12:
                raise ValueError(
                    f"density_schedule='em_s' starts at final_density + em_s_boost = {start:g}, but "
                    f"initial_density={self.initial_density}: leave initial_density unset (None)."
                )
        if self.initial_density is None:
            self.initial_density = self.final_density
        self.validate()
        if self.density_end is not None and self.density_end > self.topology_end and self.is_chtss:
            warnings.warn(
                f"density_end={self.density_end} > topology_end={self.topology_end}: the masks freeze "
                "before the density decay ends, so final_density is NOT reached (as in the reference "
                "CHTss recipe). Leave density_end unset to reach it exactly.",
                stacklevel=3,
            )

    def _apply_method_preset(self) -> None:
        """``method`` names a preset of :data:`METHOD_PRESETS`: fields not given explicitly take its values.

        ``CHTssConfig(method="rigl", final_density=0.1)`` equals ``CHTssConfig.for_method("rigl",
        final_density=0.1)``; explicitly given fields win over the preset, as in ``for_method``.
        """
        key = str(self.method).lower()
        if key not in METHOD_PRESETS:
            raise ValueError(
                f"method={self.method!r} is not a known method; choose one of {sorted(METHOD_PRESETS)} "
                "(the preset's fields are applied, fields you pass override them)."
            )
        self.method = key
        explicit = getattr(self, "_explicit_fields", frozenset())
        for name, value in METHOD_PRESETS[key].items():
            if name not in explicit:
                setattr(self, name, value)
        if key == "static":  # static sparse never rewires, whatever interval a shared recipe sets
            self.update_interval = 0

    @property
    def is_chtss(self) -> bool:
        """True when the density decays (CHTss), False at fixed density (CHTs and baselines)."""
        return self.initial_density != self.final_density

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field and the fix."""
        self._validate_densities_and_choices()
        self._validate_ranges()

    def _validate_densities_and_choices(self) -> None:
        for name in ("final_density", "initial_density"):
            value = getattr(self, name)
            if not (0.0 < float(value) <= 1.0):
                raise ValueError(
                    f"{name}={value} is outside (0, 1]: densities are fractions of kept links, e.g. 0.3."
                )
        if self.final_density > self.initial_density:
            raise ValueError(
                f"final_density={self.final_density} > initial_density={self.initial_density}: CHTss only "
                "prunes. Set initial_density >= final_density (equal, or None, gives CHTs at fixed density)."
            )
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}.")

    def _validate_ranges(self) -> None:
        if not (0.0 <= self.zeta < 1.0):
            raise ValueError(
                f"zeta={self.zeta} must be in [0, 1): it is the fraction of active links rewired."
            )
        if not (0.0 < self.topology_end <= 1.0):
            raise ValueError(f"topology_end={self.topology_end} must be in (0, 1] (fraction of training).")
        auto = self.update_interval == "auto"
        if not auto and (isinstance(self.update_interval, bool) or not isinstance(self.update_interval, int)):
            raise ValueError(
                f"update_interval={self.update_interval!r} must be 'auto' or a number of optimizer steps (int)."
            )
        if not auto and self.update_interval < 0:
            raise ValueError(f"update_interval={self.update_interval} must be >= 0 (0 means static sparse).")
        if not (0.0 <= self.brf_randomness <= 1.0):
            raise ValueError(f"brf_randomness={self.brf_randomness} must be in [0, 1].")
        if self.temperature_start <= 0 or self.temperature_end <= 0:
            raise ValueError("temperature_start and temperature_end must be > 0.")
        if self.total_steps is not None and self.total_steps <= 0:
            raise ValueError(f"total_steps={self.total_steps} must be a positive number of optimizer steps.")
        if self.predictor_chunk <= 0 or self.predictor_batch <= 0:
            raise ValueError("predictor_chunk and predictor_batch must be > 0.")
        self._validate_em_s()
        if self.density_end is not None and not (0.0 < self.density_end <= 1.0):
            raise ValueError(f"density_end={self.density_end} must be in (0, 1] (fraction of training).")
        if not self.targets:
            raise ValueError("targets is empty: give at least one module-name pattern, e.g. r'\\.fc\\d$'.")

    def _validate_em_s(self) -> None:
        if self.density_schedule != "em_s":
            return
        if not (self.em_s_boost > 0.0 and self.final_density + self.em_s_boost <= 1.0):
            raise ValueError(
                f"em_s_boost={self.em_s_boost} must be > 0 with final_density + em_s_boost <= 1."
            )
        if self.layer_density == "erk" or self.init_topology == "erk":
            raise ValueError("density_schedule='em_s' works per matrix: use layer_density='uniform'.")

    @classmethod
    def for_method(cls, method: str, **overrides) -> CHTssConfig:
        """A config for one of ``chtss``, ``chts``, ``cht``, ``cht_l3n``, ``set``, ``rigl``, ``static``, or an
        official-configuration preset (``chtss_official_llm``, ``chts_official_llm``,
        ``chts_official_mlp``, ``cht_official``; see docs/chtss.md).

        ``overrides`` win over the preset (e.g. ``final_density=0.01, zeta=0.3``).
        """
        key = method.lower()
        if key not in METHOD_PRESETS:
            raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHOD_PRESETS)}.")
        known = {f.name for f in dataclasses.fields(cls)} - {"method"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown CHTssConfig option(s) {unknown}; valid options: {sorted(known)}")
        values = dict(METHOD_PRESETS[key])
        values.update(overrides)
        values["method"] = key
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
