"""Configuration of CHTs / CHTss dynamic sparse training (and the SET / RigL / CHT baselines)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["DEFAULT_TARGETS", "CHTssConfig", "METHOD_PRESETS"]

# Decoder-block projections (LLaMA, Qwen2, Mistral, ...); embeddings, norms and lm_head stay dense.
DEFAULT_TARGETS = (r"(^|\.)(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",)

REGROWTH = ("CH2_L3n", "CH3_L3n", "CH3.1_L3n", "CH2_L3p", "CH3_L3p", "random", "gradient")
REMOVAL = ("weight", "ri", "mest")
SAMPLING = ("soft", "hard")
DENSITY_SCHEDULES = ("sigmoid", "linear", "cubic")
ZETA_SCHEDULES = ("cosine", "constant")
INIT_TOPOLOGIES = ("er", "erk", "brf")
LAYER_DENSITY = ("uniform", "erk")
PRUNE_SCORES = ("ri", "weight")

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
    # CHT (ICLR 2024): hard magnitude removal, hard top-k CH regrowth, fixed density.
    "cht": {
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
        update_interval: optimizer steps between two topology updates (0: static sparse training).
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
        density_schedule: "sigmoid" (CHTss, steepness ``sigmoid_k``), "linear" or "cubic".
        prune_score: score of the CHTss density pruning (hard top-k): "ri" or "weight".
        chain_removal: drop links of neurons left without inputs or outputs (MLP / SwiGLU aware).
        init_topology: "er" (uniform random), "erk" (alias of er with ERK layer densities) or "brf".
        layer_density: "uniform" (every matrix at the same density) or "erk" (Erdos-Renyi-Kernel).
        brf_randomness: r in [0, 1] of the bipartite receptive field (0: nearest neighbours, 1: ER).
        sparse_init: re-draw targeted weights with std sqrt(2 / (density * fan_in)).
        rewarmup_steps: linear LR re-warm-up over this many steps after each update (0: off).
        balance_heads: give every attention head (q/k/v rows, o columns; GQA aware) equal links.
        predictor_chunk: rows of A A^T / A^T A computed at once by the L3n predictor.
        predictor_batch: at most this many same-shape matrices per batched predictor call (memory).
        allow_tf32: let the L3n GEMMs use TF32 on CUDA (never bf16/fp16).
        seed: seed of every random draw (initial masks, sampling); all ranks agree through it.
        method: a named preset (``chtss``, ``chts``, ``cht``, ``set``, ``rigl``, ``static``): the fields
            of :data:`METHOD_PRESETS` that are not passed explicitly take the preset's values, so
            ``CHTssConfig(method="rigl")`` is RigL (same as ``CHTssConfig.for_method("rigl")``).
    """

    final_density: float = 0.3
    initial_density: float | None = 0.5
    targets: tuple[str, ...] | list[str] | str = DEFAULT_TARGETS
    exclude: tuple[str, ...] | list[str] | str = (r"lm_head", r"embed")
    update_interval: int = 100
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
    sparse_init: bool = False
    rewarmup_steps: int = 0
    balance_heads: bool = False
    predictor_chunk: int = 4096
    predictor_batch: int = 16
    allow_tf32: bool = True
    seed: int = 0
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
        if self.initial_density is None:
            self.initial_density = self.final_density
        self.validate()

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
        choices = {
            "regrowth": REGROWTH,
            "regrowth_sampling": SAMPLING,
            "removal": REMOVAL,
            "removal_sampling": SAMPLING,
            "density_schedule": DENSITY_SCHEDULES,
            "zeta_schedule": ZETA_SCHEDULES,
            "init_topology": INIT_TOPOLOGIES,
            "layer_density": LAYER_DENSITY,
            "prune_score": PRUNE_SCORES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}.")
        if not (0.0 <= self.zeta < 1.0):
            raise ValueError(
                f"zeta={self.zeta} must be in [0, 1): it is the fraction of active links rewired."
            )
        if not (0.0 < self.topology_end <= 1.0):
            raise ValueError(f"topology_end={self.topology_end} must be in (0, 1] (fraction of training).")
        if self.update_interval < 0:
            raise ValueError(f"update_interval={self.update_interval} must be >= 0 (0 means static sparse).")
        if not (0.0 <= self.brf_randomness <= 1.0):
            raise ValueError(f"brf_randomness={self.brf_randomness} must be in [0, 1].")
        if self.temperature_start <= 0 or self.temperature_end <= 0:
            raise ValueError("temperature_start and temperature_end must be > 0.")
        if self.total_steps is not None and self.total_steps <= 0:
            raise ValueError(f"total_steps={self.total_steps} must be a positive number of optimizer steps.")
        if self.predictor_chunk <= 0 or self.predictor_batch <= 0:
            raise ValueError("predictor_chunk and predictor_batch must be > 0.")
        if not self.targets:
            raise ValueError("targets is empty: give at least one module-name pattern, e.g. r'\\.fc\\d$'.")

    @classmethod
    def for_method(cls, method: str, **overrides) -> CHTssConfig:
        """A config for one of ``chtss``, ``chts``, ``cht``, ``set``, ``rigl``, ``static``.

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
        if key == "static":  # static sparse never rewires, whatever interval a shared recipe sets
            values["update_interval"] = 0
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
