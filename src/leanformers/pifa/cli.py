"""Deprecated: ``leanformers.pifa.cli`` moved to ``leanformers.compression.cli`` (the command) and
``leanformers.compression.options`` (its options); this shim re-exports the old names."""

from leanformers.compression.cli import main, run
from leanformers.compression.options import (
    DEFAULT_CALIBRATION,
    build_configs,
    build_parser,
    parse_groups,
    resolve_options,
)
from leanformers.pifa import warn_moved

warn_moved("leanformers.pifa.cli", "leanformers.compression.cli, leanformers.compression.options")


def build_config(opts):
    """The one config of the resolved options (the old single-method form of ``build_configs``)."""
    return build_configs(opts)[0]


__all__ = [
    "DEFAULT_CALIBRATION",
    "build_config",
    "build_parser",
    "main",
    "parse_groups",
    "resolve_options",
    "run",
]
