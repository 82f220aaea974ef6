"""The options of ``leanformers-compress`` / ``mpifa-compress``: one table for the flags and ``--config``.

CLI-only options are listed in ``CLI_OPTIONS``; every scalar field of every registered compressor's
config becomes a flag too (``config_flags``), with its default and its docstring entry, so defaults and
docs live once, in the configs. A flag that no chosen ``--method`` takes is refused (``--alpha`` with
``wanda-2:4``); YAML values of ``--config`` are type-checked against the same table.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from leanformers import recipes
from leanformers.compression.compressor import COMPRESSORS, get_compressor
from leanformers.compression.config import CompressionConfig

__all__ = [
    "CLI_OPTIONS",
    "DEFAULT_CALIBRATION",
    "build_configs",
    "build_parser",
    "config_flags",
    "load_config_file",
    "options_table",
    "parse_groups",
    "parse_methods",
    "resolve_options",
]

# Text the model writes itself (compression/self_calibration.py) mixed 3:1 with leanformers' own source
# code: offline, no dataset, and no other package's files (whose versions would change the calibration,
# issue 19 #14). Chosen on the validation texts only (docs/benchmarks.md §19); a calibration that has
# seen no code made code 300-400x more perplexed at density 0.5 (§14).
DEFAULT_CALIBRATION = "self=3,python:leanformers=1"

# CLI-only options: name -> (type, default, help).
CLI_OPTIONS: dict[str, tuple] = {
    "output": (str, None, "output folder (required; with --compare, one sub-folder per method)"),
    "method": (str, "mpifa", "compression method(s), comma-separated with --compare"),
    "compare": (
        bool,
        False,
        "compress a fresh copy of the source with every --method on the same calibration windows and "
        "print one side-by-side table (and write compare.json into --output)",
    ),
    "calib": (
        str,
        DEFAULT_CALIBRATION,
        "calibration text: 'self' (text the model generates), a local .txt/.json/.parquet/.py file, a "
        "folder of them, python:<module> or a datasets name[:config][@split]; several sources mix by "
        "weight: 'self=2,wiki.txt=1'",
    ),
    "storage": (
        str,
        None,
        "how low-rank methods store their factors: pifa or lowrank (default: the method's)",
    ),
    "lowrank": (bool, False, "same as --storage lowrank (MPIFA's low-rank ablation)"),
    "dtype": (str, "auto", "dtype to load and save the model in: auto, float32, bfloat16, float16"),
    "gguf_file": (str, None, "GGUF file name inside SOURCE (when SOURCE is a folder or Hub id)"),
    "revision": (
        str,
        None,
        "pin a Hub SOURCE to this branch, tag or commit (recorded in the card and config)",
    ),
    "eval": (str, None, "text file (or dataset) to measure perplexity on before and after"),
    "eval_seqlen": (int, 2048, "context length of the perplexity evaluation"),
    "eval_tokens": (int, None, "evaluate on the first N tokens only"),
    "tasks": (str, None, "lm-eval zero-shot tasks to score before and after, e.g. arc_easy,piqa"),
    "tasks_limit": (int, None, "documents per zero-shot task (default: all)"),
    "tasks_data_dir": (
        str,
        None,
        "folder of the local zero-shot task files that --tasks reads offline (default: "
        "$LEANFORMERS_ZEROSHOT_DATA, else ../shared/data/zeroshot when present; 'none': lm-eval's Hub datasets)",
    ),
    "push_to_hub": (str, None, "publish the output folder to this Hub repo (org/name)"),
    "private": (bool, False, "make the Hub repo private"),
    "overwrite": (bool, False, "replace an existing non-empty output folder"),
    "stream": (
        bool,
        False,
        "compress block by block from the safetensors shards of a local SOURCE folder, for a model larger "
        "than host memory (one block in memory at a time; see docs/scaling.md)",
    ),
    "max_shard_size": (str, "5GB", "largest safetensors shard of the output folder"),
    "report": (str, None, "also write the summary as JSON to this file"),
    "heal_tokens": (
        int,
        0,
        "after compressing, distil the dense model into the compressed layers' own factors on N tokens of "
        "text the dense model generates (low-rank methods, in memory; see docs/mpifa.md, healing)",
    ),
    "heal_lr": (
        float,
        None,
        "peak learning rate of --heal-tokens (default: HealingConfig.learning_rate; docs/mpifa.md, healing)",
    ),
}

# Config fields without a flag of their own: ``output`` is --storage (--output is the folder), the lists
# ``targets`` / ``attention`` are Python-API settings, ``offload_streams`` a deprecated alias.
_NO_FLAG = {"output", "targets", "attention", "offload_streams"}
# The command line's own spelling of a field (a string that parse_groups splits), or a field whose
# docstring entry is shared with another one and says too little on its own.
_CLI_FIELDS: dict[str, tuple] = {
    "seqlen": (int, "tokens per calibration window"),
    "blocks_path": (str, "layout override: path of the ModuleList of blocks (default: inferred)"),
    "groups": (
        str,
        "layout override: linears inside a block, ',' within a group sharing one input, ';' between "
        "groups in order, e.g. 'attn.q,attn.k,attn.v;attn.o;mlp.up;mlp.down' (default: inferred)",
    ),
}
_SCALARS = {"bool": bool, "int": int, "float": float, "str": str}


def _scalar_name(annotation) -> str:
    """'float' for float, 'float | None', Optional[float] or their string forms (postponed annotations)."""
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation).replace("typing.", "").replace(" | None", "").replace("None | ", "")
    return text.removeprefix("Optional[").removesuffix("]") if text.startswith("Optional[") else text


def _docs(cls: type) -> dict[str, str]:
    """Per-field help of a config class and its bases (the nearest docstring wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(recipes.field_docs(klass))
    return docs


def config_flags(config_classes: list[type[CompressionConfig]] | None = None) -> dict[str, tuple]:
    """name -> (type, default, help, methods taking it) for every scalar field of the given config classes
    (default: every registered compressor's). The default shown is the first class's that has the field."""
    classes = config_classes or [c.config_class for c in COMPRESSORS.values()]
    flags: dict[str, tuple] = {}
    for cls in classes:
        docs = _docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in _NO_FLAG:
                continue
            if f.name in flags:
                typ, default, help_text, methods = flags[f.name]
                flags[f.name] = (typ, default, help_text, (*methods, cls.method))
                continue
            if f.name in _CLI_FIELDS:
                typ, help_text = _CLI_FIELDS[f.name]
            else:
                base = _scalar_name(f.type)
                if base not in _SCALARS:
                    raise TypeError(
                        f"{cls.__name__}.{f.name}: {f.type} has no command-line form; add it to _NO_FLAG"
                    )
                typ, help_text = _SCALARS[base], docs.get(f.name, "")
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            flags[f.name] = (typ, default, help_text, (cls.method,))
    return flags


def options_table() -> dict[str, tuple]:
    """Every option of the command line and of --config: name -> (type, default, help)."""
    table = {k: v[:3] for k, v in CLI_OPTIONS.items()}
    table.update({k: v[:3] for k, v in config_flags().items()})
    return table


def build_parser(prog: str = "leanformers-compress") -> argparse.ArgumentParser:
    methods = ", ".join(sorted(COMPRESSORS))
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"Compress a causal LM with MPIFA or a baseline ({methods}). Flags a method does not "
        "take are refused; the method's own defaults apply otherwise.",
    )
    parser.add_argument("source", nargs="?", help="Hub id, local folder or .gguf file")
    parser.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    flags = config_flags()
    for name, (typ, default, help_text) in options_table().items():
        flag = "--" + name.replace("_", "-")
        help_text = help_text.replace("``", "").replace("%", "%%")
        if name in flags and len(flags[name][3]) < len(COMPRESSORS):
            help_text += f" [{', '.join(flags[name][3])}]"
        if typ is bool and default is not False:  # on or auto by default: --no-<flag> turns it off
            shown = " (default: on)" if default else " (default: auto, as described)"
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text + shown
            )
        elif typ is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            shown = f" (default: {default})" if default is not None else ""
            parser.add_argument(flag, type=typ, default=None, help=help_text + shown)
    return parser


def _check_yaml_types(data: dict[str, Any], table: dict[str, tuple], source: str) -> None:
    """A YAML value must have its flag's type: booleans true/false (not "false"), integers for ints."""
    for key, value in data.items():
        typ = table[key][0]
        ok = (
            value is None
            or (typ is bool and isinstance(value, bool))
            or (typ is int and isinstance(value, int) and not isinstance(value, bool))
            or (typ is float and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (typ is str and isinstance(value, (str, list)) and key == "groups")
            or (
                typ is str
                and isinstance(value, (str, int, float))
                and not isinstance(value, bool)
                and key != "groups"
            )
        )
        if not ok:
            hint = " (write true or false, without quotes)" if typ is bool else ""
            raise ValueError(f"{source}: {key} must be a {typ.__name__}, got {value!r}{hint}")


def load_config_file(path, table: dict[str, tuple] | None = None) -> dict[str, Any]:
    """The options of a ``--config`` YAML file, keys normalised (``-`` -> ``_``), every key known and every
    value of its option's type; a ValueError naming the key otherwise."""
    table = table or options_table()
    data = {k.replace("-", "_"): v for k, v in recipes.read_yaml(path).items()}
    recipes.check_keys(data, table, what=f"keys in {path}:")
    _check_yaml_types(data, table, str(path))
    return data


def resolve_options(argv: list[str] | None = None, prog: str = "leanformers-compress") -> argparse.Namespace:
    """Parse flags, merged over a YAML --config, merged over the CLI defaults. ``given`` lists the options
    set by a flag or the YAML file (the rest are defaults)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    table = options_table()
    merged = {name: spec[1] for name, spec in table.items()}
    merged["source"] = None
    given: set[str] = set()
    if args.config:
        try:
            data = load_config_file(args.config, table)
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
        merged.update(data)
        given |= set(data)
    flags = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    merged.update(flags)
    given |= set(flags) - {"source"}
    if not merged["source"]:
        parser.error("give the model to compress (a Hub id, a local folder or a .gguf file)")
    if not merged["output"]:
        parser.error("--output is required")
    merged["given"] = sorted(given)
    return argparse.Namespace(**merged)


def parse_methods(value: str) -> list[str]:
    """'mpifa,svd-llm' -> ['mpifa', 'svd-llm'], each a registered compressor (ValueError otherwise)."""
    methods = [m.strip() for m in str(value).split(",") if m.strip()]
    if not methods:
        raise ValueError("--method names no compression method")
    for m in methods:
        get_compressor(m)
    if len(set(methods)) != len(methods):
        raise ValueError(f"--method lists a method twice: {value!r}")
    return methods


def parse_groups(value) -> list[list[str]] | None:
    """--groups 'a,b,c;d;e,f;g' (or a YAML list of lists) -> [[a, b, c], [d], [e, f], [g]]."""
    if value is None:
        return None
    if isinstance(value, str):
        groups = [[n.strip() for n in g.split(",") if n.strip()] for g in value.split(";")]
    elif isinstance(value, (list, tuple)):
        groups = [[str(n) for n in ([g] if isinstance(g, str) else g)] for g in value]
    else:
        raise ValueError(
            f"--groups must be a string like 'q,k,v;o;up;down' or a list of lists, got {value!r}"
        )
    groups = [g for g in groups if g]
    if not groups:
        raise ValueError(f"--groups {value!r} names no module")
    return groups


def _storage(opts: argparse.Namespace) -> str | None:
    if opts.lowrank and opts.storage not in (None, "lowrank"):
        raise ValueError(f"--lowrank contradicts --storage {opts.storage}")
    storage = "lowrank" if opts.lowrank else opts.storage
    if storage not in (None, "pifa", "lowrank"):
        raise ValueError(f"--storage must be pifa or lowrank, got {storage!r}")
    return storage


def build_configs(opts: argparse.Namespace) -> list[CompressionConfig]:
    """One config per --method, from the options that were given (the method's defaults otherwise).

    An option given for methods none of which takes it is refused, naming the methods that do."""
    methods = parse_methods(opts.method)
    classes = [get_compressor(m).config_class for m in methods]
    flags = config_flags()
    given = set(getattr(opts, "given", [])) & set(flags)
    storage = _storage(opts)
    if storage is not None:
        given.add("output")
    for name in sorted(given):
        takers = [c.method for c in classes if name in c.field_names()]
        if not takers:
            flag = "--storage/--lowrank" if name == "output" else "--" + name.replace("_", "-")
            others = flags[name][3] if name in flags else ("mpifa", "svd", "svd-llm", "asvd")
            raise ValueError(
                f"{flag} does not apply to --method {','.join(methods)}; it is an option of {', '.join(others)}"
            )
    configs = []
    for cls in classes:
        values = {n: getattr(opts, n) for n in given if n in cls.field_names() and n != "output"}
        if "groups" in values:
            values["groups"] = parse_groups(values["groups"])
        if storage is not None and "output" in cls.field_names():
            values["output"] = storage
        configs.append(cls(**values))
    return configs
