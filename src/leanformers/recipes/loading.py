"""The YAML layer of every recipe: loading, ``--set key.sub=value`` overrides, top-level sections.

Used by ``leanformers-train`` (:func:`leanformers.recipes.load_training_recipe` adds the training
schema on top), the MNIST MLP runner (``bench/mlp_mnist.py``) and ``mpifa-compress --config``. A recipe is a plain ``dict`` read from YAML;
override values are parsed as YAML too (``training.max_steps=10`` is an int, ``model.sizes=[784, 10]``
a list, ``method.sst.r=null`` None).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

__all__ = ["apply_overrides", "check_keys", "field_docs", "load_recipe", "read_yaml", "set_dotted"]


def read_yaml(source: str | os.PathLike | dict) -> dict:
    """A recipe as a new ``dict``: a deep copy of a dict, or a YAML file's mapping (empty file -> {})."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(
            f"recipe {path} must be a YAML mapping (key: value lines), got {type(data).__name__}"
        )
    return data


def set_dotted(recipe: dict, dotted: str, value: Any) -> None:
    """``recipe[a][b][c] = value`` for ``dotted = "a.b.c"``, creating missing sections."""
    keys = dotted.split(".")
    node = recipe
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {key!r} is not a section of the recipe")
    node[keys[-1]] = value


def apply_overrides(recipe: dict, overrides: Iterable[str] | None) -> dict:
    """Apply ``key.sub=value`` items in order (values parsed as YAML); returns ``recipe`` (changed in place)."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key.sub=value, got {item!r}")
        key, _, raw = item.partition("=")
        set_dotted(recipe, key.strip(), yaml.safe_load(raw))
    return recipe


def check_keys(mapping: dict, valid: Iterable[str], what: str = "recipe sections") -> None:
    """Raise a ValueError naming the keys of ``mapping`` outside ``valid``, and the valid ones."""
    valid = list(valid)
    unknown = sorted(set(mapping) - set(valid))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; use {', '.join(valid)}")


def load_recipe(
    source: str | os.PathLike | dict,
    overrides: Iterable[str] | None = None,
    sections: Iterable[str] | None = None,
    required: Iterable[str] = (),
    what: str = "recipe sections",
) -> dict:
    """Read a recipe, apply the overrides, then check its top-level keys.

    ``sections``: the allowed top-level keys (None: any); ``required``: those that must be present.
    """
    recipe = apply_overrides(read_yaml(source), overrides)
    if sections is not None:
        check_keys(recipe, sections, what)
    for section in required:
        if section not in recipe:
            raise ValueError(f"the recipe has no '{section}' section")
    return recipe


def field_docs(cls: type) -> dict[str, str]:
    """Per-field help from a dataclass docstring's ``Attributes:`` section (Google style).

    ``name: text`` lines, continuation lines indented deeper; ``a, b: text`` documents both ``a`` and ``b``.
    Returns ``{field name: one-line text}``; fields without an entry are absent.
    """
    lines = (cls.__doc__ or "").expandtabs().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:") + 1
    except StopIteration:
        return {}
    docs: dict[str, str] = {}
    names: list[str] = []
    indent = None
    for line in lines[start:]:
        if not line.strip():
            break
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break
        head, sep, text = line.strip().partition(":")
        if depth == indent and sep:
            names = [n.strip() for n in head.split(",")]
            for name in names:
                docs[name] = text.strip()
        else:  # a continuation of the entry above
            for name in names:
                docs[name] = f"{docs[name]} {line.strip()}"
    return docs
