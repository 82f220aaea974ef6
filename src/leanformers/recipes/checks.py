"""Recipe checks: one-line errors that name the key and the fix, "did you mean", value types.

:func:`check_value` checks a value against a dataclass field's type hint (int, float, bool,
``Literal`` / enum choices, lists, mappings, unions of them) and returns it, a float written as
``3e-4`` (YAML 1.1 reads that as a string) converted.
"""

from __future__ import annotations

import difflib
import enum
import types
import typing
from collections.abc import Iterable
from typing import Any

__all__ = ["ALIASES", "RecipeError", "check_value", "field_types", "suggest", "unknown_choice", "unknown_key"]

# Names users reach for, and the field each library calls them (checked against the valid keys).
ALIASES = {
    "rank": "r",
    "lora_rank": "r",
    "lr": "learning_rate",
    "steps": "max_steps",
    "max_step": "max_steps",
    "batch_size": "per_device_train_batch_size",
    "epochs": "num_train_epochs",
    "density": "final_density",
    "target": "targets",
    "targets": "target_modules",
}


class RecipeError(ValueError):
    """A recipe problem, said in one line that names the key and the fix (``leanformers-train`` exits 2)."""


def suggest(key: str, valid: Iterable[str]) -> str | None:
    """The valid key the user most likely meant (an alias, a close spelling), or None."""
    valid = list(valid)
    alias = ALIASES.get(key)
    if alias in valid:
        return alias
    lower = {v.lower(): v for v in valid}
    if key.lower() in lower:
        return lower[key.lower()]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return close[0] if close else None


def _listing(valid: list[str], listing: str | None) -> str:
    return listing or (", ".join(valid) if len(valid) <= 60 else f"{len(valid)} names")


def unknown_key(
    path: str, key: str, valid: Iterable[str], listing: str | None = None, what: str = "key"
) -> RecipeError:
    """``path.key: unknown key; did you mean path.other? (valid: ... or listing)``."""
    valid = sorted(valid)
    guess = suggest(key, valid)
    prefix = f"{path}." if path else ""
    hint = f"; did you mean {prefix}{guess}?" if guess else ""
    return RecipeError(f"{prefix}{key}: unknown {what}{hint} (valid: {_listing(valid, listing)})")


def unknown_choice(
    path: str, value, valid: Iterable[str], what: str, listing: str | None = None
) -> RecipeError:
    """``path=value: unknown <what>; did you mean path=other? (valid: ...)``."""
    valid = sorted(valid)
    guess = suggest(str(value), valid)
    hint = f"; did you mean {path}={guess}?" if guess else ""
    return RecipeError(f"{path}={value!r}: unknown {what}{hint} (valid: {_listing(valid, listing)})")


def field_types(cls: type) -> dict[str, Any]:
    """{field name: type hint} of a dataclass (hints that cannot be resolved are ``Any``)."""
    import dataclasses

    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a hint naming something not importable here: check names only
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _choices(hint) -> tuple | None:
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return tuple(member.value for member in hint)
    return None


def _branches(hint) -> list:
    """The alternatives of a union (an enum or Literal makes a bare ``str`` alternative redundant)."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return [hint]
    args = list(typing.get_args(hint))
    if any(_choices(a) is not None for a in args):
        args = [a for a in args if a is not str]
    return args


def _accept(hint, value) -> tuple[bool, Any]:
    """(accepted, value) of one non-union hint."""
    choices = _choices(hint)
    if choices is not None:
        return value in choices or (isinstance(value, enum.Enum) and value.value in choices), value
    origin = typing.get_origin(hint) or hint
    if hint is type(None):
        return value is None, value
    if origin is bool:
        return isinstance(value, bool), value
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if origin is float:
        if isinstance(value, str):
            try:
                return True, float(value)  # "3e-4": YAML 1.1 reads it as a string
            except ValueError:
                return False, value
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if origin in (list, tuple, set, frozenset):
        return isinstance(value, (list, tuple)), value
    if origin is dict:
        return isinstance(value, dict), value
    return True, value  # str and anything richer: the library checks it


def _describe(hints: list) -> str:
    names = []
    for hint in hints:
        choices = _choices(hint)
        origin = typing.get_origin(hint) or hint
        if choices is not None:
            names.append("one of " + ", ".join(map(str, choices)))
        elif hint is type(None):
            names.append("null")
        else:
            names.append(
                {
                    bool: "true or false",
                    int: "an integer",
                    float: "a number",
                    list: "a list",
                    dict: "a mapping",
                }.get(origin, getattr(origin, "__name__", str(origin)))
            )
    return " or ".join(dict.fromkeys(names))


def check_value(path: str, value, hint) -> Any:
    """``value`` if it fits ``hint`` (converted where YAML misread a float), else a :class:`RecipeError`."""
    branches = _branches(hint)
    for branch in branches:
        ok, converted = _accept(branch, value)
        if ok:
            return converted
    expected = _describe(branches)
    fix = ""
    if isinstance(value, float) and any((typing.get_origin(b) or b) is int for b in branches):
        fix = f", e.g. {path}={max(1, round(value))}"
    choices = next((c for c in map(_choices, branches) if c), None)
    if choices and isinstance(value, str):
        guess = suggest(value, [str(c) for c in choices])
        fix = f"; did you mean {path}={guess}?" if guess else ""
    raise RecipeError(f"{path}={value!r}: expected {expected}{fix}")
