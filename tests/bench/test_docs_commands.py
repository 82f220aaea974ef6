"""Every `python bench/...` command quoted in docs/benchmarks.md resolves to a runner and its rows (so no
published number loses its command), and bench/ stays within the issue's 4,000 lines of Python."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.bench.conftest import BENCH, load_bench
from tests.helpers import REPO_ROOT

DOCS = REPO_ROOT / "docs" / "benchmarks.md"
# a command runs to the end of its code span, table cell or line; a trailing backslash continues it
COMMAND = re.compile(r"python3? bench/(\w+)\.py((?:\\\n|[^`|\n])*)")
BENCH_LINES = 4000  # issue 18, acceptance 3: bench/ <= 4,000 lines (code does not move into src/ to meet it)


def quoted_commands() -> list[tuple[str, list[str]]]:
    """(runner, argv) of every command of the docs: comments, `...` and [optional] brackets dropped."""
    out = []
    for runner, raw in COMMAND.findall(DOCS.read_text()):
        text = re.sub(r"\[(--[^\]]*)\]", r"\1", raw.replace("\\\n", " ").split(" #")[0])
        out.append((runner, [t for t in shlex.split(text) if t != "..."]))
    return out


COMMANDS = quoted_commands()


def test_the_docs_quote_the_runners():
    runners = {r for r, _ in COMMANDS}
    assert {"compression_table", "compression_cost", "training_table", "micro", "mlp_mnist"} <= runners
    assert len(COMMANDS) > 60


@pytest.mark.parametrize(("runner", "argv"), COMMANDS, ids=[f"{r} {' '.join(a)}"[:90] for r, a in COMMANDS])
def test_quoted_command_resolves_to_a_runner_and_its_rows(runner, argv):
    path = BENCH / f"{runner}.py"
    assert path.is_file(), f"docs/benchmarks.md quotes bench/{runner}.py, which does not exist"
    module = load_bench(runner)
    assert hasattr(module, "build_parser"), f"bench/{runner}.py is not a runner (no build_parser)"
    try:
        args = module.build_parser().parse_args(argv)  # unknown flags and row names are errors here
    except SystemExit as exc:
        pytest.fail(f"python bench/{runner}.py {' '.join(argv)}: the runner's parser refuses it ({exc})")
    rows = getattr(args, "rows", None) or []
    if runner == "compression_table" and not args.texts:  # the five-text rows run only with --texts
        assert not [r for r in rows if "calibration" in module.ROWS[r]], (
            "a --texts row quoted without --texts"
        )
    for name in rows:  # the row exists (argparse choices) and every --set names one of its settings
        if hasattr(args, "sets"):
            load_bench("harness").row_settings(name, module.ROWS[name], args.quick, args.sets)
    if getattr(args, "overrides", None) and rows:  # mlp_mnist --rows: --set applies to the rows
        for name in rows:
            load_bench("harness").row_settings(name, module.ROWS[name], args.quick, args.overrides)


def test_bench_python_stays_within_the_line_budget():
    lines = {p.name: len(p.read_text().splitlines()) for p in BENCH.glob("*.py")}
    assert sum(lines.values()) <= BENCH_LINES, f"bench/*.py: {sum(lines.values())} lines, {lines}"
