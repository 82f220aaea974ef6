"""The method registry of ``leanformers-train``: dense, lora, sst and every CHTss preset.

A method turns the model into what trains and gives the Trainer callbacks. Adding one is one entry::

    def build(model, options):          # options = recipe["method"].get("mine", {})
        return model, [MyCallback(**options)]
    METHODS["mine"] = build             # or Method(build, options=MyConfig) for checked options

:class:`Method` adds what the recipe checks need: the options' dataclass (keys and value types
checked up front, "did you mean"), the family whose shared options (rank, targets, density) carry
over when ``method.name`` switches to a method the recipe has no section for (:func:`resolve_method`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback

from leanformers.chts.config import METHOD_PRESETS
from leanformers.recipes.checks import RecipeError

__all__ = ["CARRIED", "METHODS", "Method", "MethodBuilder", "resolve_method"]

MethodBuilder = Callable[[torch.nn.Module, dict], tuple[torch.nn.Module, list[TrainerCallback]]]

# options shared by the methods of one family: carried over when method.name switches inside it
CARRIED = {"low-rank": ("r", "target_modules"), "dst": ("final_density", "targets", "exclude")}


@dataclass(frozen=True)
class Method:
    """A registered method: the builder plus what its recipe options are.

    Attributes:
        build: ``(model, options) -> (model to train, Trainer callbacks)``.
        options: ``() -> the options' dataclass`` (None: no options); checked up front.
        extra_options: ``{name: type hint}`` of options outside the dataclass.
        family: ``"low-rank"`` or ``"dst"`` (see :data:`CARRIED`), or None.
        make_config: ``options -> config object``, built up front to catch bad values (None: skip).
        doc: one line for ``leanformers-train --help``.
    """

    build: MethodBuilder
    options: Callable[[], type] | None = None
    extra_options: dict | None = None
    family: str | None = None
    make_config: Callable[[dict], Any] | None = None
    doc: str = ""

    def __call__(self, model: torch.nn.Module, options: dict):
        return self.build(model, options)


def _dense(model, options):
    if options:
        raise RecipeError(f"method 'dense' takes no options, got {sorted(options)}: remove method.dense")
    return model, []


def _set_trainable_in_place(model: torch.nn.Module, names: list[str]) -> None:
    """Make parameters of modules whose name ends with one of ``names`` trainable (no copies)."""
    found = set()
    for module_name, module in model.named_modules():
        for wanted in names:
            if module_name == wanted or module_name.endswith("." + wanted):
                found.add(wanted)
                for p in module.parameters(recurse=True):
                    if p.is_floating_point():
                        p.requires_grad_(True)
    missing = sorted(set(names) - found)
    if missing:
        raise RecipeError(f"method.lora.train_modules: {missing} match no module of the model")


def _lora_config(options: dict):
    from peft import LoraConfig

    options = {k: v for k, v in options.items() if k != "train_modules"}
    options.setdefault("target_modules", "all-linear")
    return LoraConfig(**options)


def _lora(model, options):
    """PEFT LoRA. ``train_modules`` (e.g. [embed_tokens, lm_head, norm]) train in place, as in the SST
    paper's LoRA baseline for pretraining; note that LoRA's save_pretrained does not store them."""
    from peft import get_peft_model

    model = get_peft_model(model, _lora_config(options))
    if options.get("train_modules"):
        _set_trainable_in_place(model, list(options["train_modules"]))
    return model, []


def _sst(model, options):
    from peft import get_peft_model

    from leanformers.sst import SSTCallback, SSTConfig

    return get_peft_model(model, SSTConfig(**options)), [SSTCallback()]


def _sst_options():
    from leanformers.sst import SSTConfig

    return SSTConfig


def _lora_options():
    from peft import LoraConfig

    return LoraConfig


def _chtss_options():
    from leanformers.chts import CHTssConfig

    return CHTssConfig


def _sparse(name: str) -> Method:
    """A CHTss preset (chtss, chts, set, rigl, ...): options are CHTssConfig fields on top of the preset."""

    def config(options: dict):
        from leanformers.chts import CHTssConfig

        return CHTssConfig.for_method(name, **options)

    def build(model, options):
        from leanformers.chts import CHTssCallback

        return model, [CHTssCallback(config(options))]

    return Method(build, _chtss_options, family="dst", make_config=config, doc=f"CHTssConfig preset {name!r}")


def _sst_config(options: dict):
    from leanformers.sst import SSTConfig

    return SSTConfig(**options)


METHODS: dict[str, MethodBuilder] = {
    "dense": Method(_dense, doc="every parameter trains (full rank, dense)"),
    "lora": Method(
        _lora,
        _lora_options,
        {"train_modules": list[str] | None},
        "low-rank",
        _lora_config,
        "peft LoRA (target_modules default all-linear); train_modules train in place",
    ),
    "sst": Method(_sst, _sst_options, None, "low-rank", _sst_config, "Sparse Spectral Training (SSTConfig)"),
    # every preset of CHTssConfig (incl. the official ones); the table lives once, in chts/config.py
    **{name: _sparse(name) for name in METHOD_PRESETS},
}


def _carry(chosen: str, own: dict, sources: dict[str, dict], switched: bool) -> tuple[dict, list[str]]:
    """``own`` plus the family's shared options the recipe gives elsewhere; notes on what happened."""
    family = getattr(METHODS.get(chosen), "family", None)
    carried = CARRIED.get(family, ())
    same = {n: o for n, o in sources.items() if family and getattr(METHODS.get(n), "family", None) == family}
    notes, options = [], dict(own)
    for key in carried:
        values = {repr(o[key]): (n, o[key]) for n, o in same.items() if key in o}
        if key in options or not values:
            continue
        if len(values) > 1:
            given = ", ".join(f"method.{n}.{key}={v!r}" for n, v in values.values())
            raise RecipeError(f"method.name={chosen}: the recipe gives {given}; set method.{chosen}.{key}")
        source, value = next(iter(values.values()))
        options[key] = value
        notes.append(f"method.{chosen}.{key}={value!r} carried from method.{source}")
    for source, opts in sources.items() if switched else ():
        unused = [f"{k}={v!r}" for k, v in sorted(opts.items()) if not (source in same and k in carried)]
        if unused:
            notes.append(f"method.{source} options not used by {chosen}: {', '.join(unused)}")
    return options, notes


def resolve_method(method: dict) -> tuple[str, dict, list[str]]:
    """``(name, options, notes)`` of the recipe's ``method`` section.

    The options are ``method.<name>``, plus the family's shared options (:data:`CARRIED`: rank and
    targets of the low-rank methods, density and targets of the DST presets) that it lacks and the
    recipe's other sections of the same family agree on: a ``method.name`` switch keeps the recipe's
    budget. ``notes`` say what was carried and, on a switch to a method without a section, which
    options of the other sections no longer apply.
    """
    name = method.get("name", "dense")
    sources = {k: v for k, v in method.items() if k not in ("name", name) and isinstance(v, dict) and v}
    switched = name not in method
    options, notes = _carry(name, dict(method.get(name) or {}), sources, switched)
    if not notes:
        return name, options, []
    head = f"method.{name} is not in the recipe" if switched else f"method.{name}"
    return name, options, [f"{head}: " + "; ".join(notes)]
