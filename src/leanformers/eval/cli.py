"""``leanformers-eval``: lm-eval's command line with leanformers registered and offline tasks wired.

It takes lm-eval's flags unchanged (``--model hf --model_args pretrained=DIR,peft=ADAPTER --tasks ...
--limit N --output_path ...``), prints lm-eval's table and writes lm-eval's JSON, because after the
set-up below it hands over to lm-eval's own entry point (``lm_eval.__main__.cli_evaluate``).

Set-up, all of it in this process before lm-eval parses anything:

- ``import leanformers`` registers the ``mpifa`` transformers quantizer (MPIFA folders load) and the
  ``sst`` PEFT type (SST adapters load through ``peft=``). Plain ``lm_eval`` lacks both, which is why
  it fails with ``Unknown quantization type, got mpifa`` on an mpifa-compress output.
- ``--data-dir DIR`` (ours; default ``../shared/data/zeroshot`` when it exists, ``none`` for the
  Hub): lm-eval's arc_easy, arc_challenge, piqa, winogrande and lambada_openai read their data
  from DIR (see :mod:`leanformers.eval.tasks`), passed to lm-eval as ``--include_path``.
- a ``pretrained=`` / ``peft=`` local path that holds no model is refused with a message naming
  the fix, before lm-eval loads anything.
"""

from __future__ import annotations

import json
import sys

from leanformers.eval.tasks import LOCAL_TASKS

__all__ = ["main"]

_SUBCOMMANDS = ("run", "ls", "validate")


def _pop_option(argv: list[str], *names: str) -> tuple[str | None, list[str]]:
    """Remove ``--name VALUE`` / ``--name=VALUE`` from argv; returns (last value or None, rest)."""
    value, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if name in names:
            if eq:
                value = inline
            else:
                if i + 1 >= len(argv):
                    raise SystemExit(f"leanformers-eval: error: {name} needs a value")
                value = argv[i + 1]
                i += 1
        else:
            rest.append(arg)
        i += 1
    return value, rest


def _option(argv: list[str], *names: str) -> str | None:
    return _pop_option(argv, *names)[0]


def _model_args(raw: str | None) -> dict:
    """lm-eval's ``--model_args``: ``k=v,k2=v2`` or a JSON object."""
    if not raw:
        return {}
    raw = raw.strip()
    if raw.startswith("{"):
        return json.loads(raw)
    out = {}
    for item in raw.split(","):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


def _tasks(argv: list[str]) -> list[str]:
    raw = _option(argv, "--tasks", "-t")
    return [t.strip() for t in raw.split(",") if t.strip()] if raw else []


def prepare(argv: list[str]) -> list[str]:
    """lm-eval argv for ``argv``: checks the model paths, writes the local tasks, adds --include_path."""
    from leanformers.eval.tasks import resolve_data_dir, write_local_tasks
    from leanformers.eval.zeroshot import model_folder_error

    data_dir, argv = _pop_option(argv, "--data-dir", "--data_dir")
    command = argv[0] if argv and argv[0] in _SUBCOMMANDS else "run"
    if command == "run" and argv:
        model_args = _model_args(_option(argv, "--model_args", "-a"))
        for key in ("pretrained", "peft"):
            if key in model_args:
                error = model_folder_error(model_args[key])
                if error:
                    raise FileNotFoundError(f"--model_args {key}={model_args[key]}: {error}")
    if data_dir is not None and data_dir.lower() in ("none", "hub"):
        return argv
    tasks = _tasks(argv)
    folder = resolve_data_dir(data_dir, tasks)
    if folder is None:
        return argv
    if _option(argv, "--include_path") is not None:
        raise ValueError(
            "--include_path cannot be combined with the local tasks (leanformers passes its own); "
            "add --data-dir none to use only your --include_path, or put your YAMLs next to lm-eval's"
        )
    include = write_local_tasks(folder)
    local = [t for t in tasks if t in LOCAL_TASKS] or list(LOCAL_TASKS)
    print(f"leanformers-eval: {', '.join(local)} read local files from {folder}", file=sys.stderr)
    import atexit
    import shutil

    atexit.register(shutil.rmtree, include, True)
    if command in ("ls", "validate") or not argv or argv[0] in _SUBCOMMANDS:
        return [*argv, "--include_path", str(include)]
    return ["run", *argv, "--include_path", str(include)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in ([], ["-h"], ["--help"]):
        print(__doc__.strip() + "\n\nlm-eval's own help follows (`leanformers-eval run -h` for the flags).\n")
    import leanformers  # noqa: F401  registers the mpifa quantizer and the sst PEFT type

    try:
        lm_eval_argv = prepare(argv)
    except (FileNotFoundError, ValueError) as exc:
        print(f"leanformers-eval: error: {exc}", file=sys.stderr)
        return 2
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:  # pragma: no cover - depends on the install
        print(
            "leanformers-eval: error: lm-eval is not installed; pip install 'leanformers[eval]'",
            file=sys.stderr,
        )
        return 2
    saved = sys.argv
    sys.argv = ["leanformers-eval", *lm_eval_argv]
    try:
        cli_evaluate()
    except ValueError as exc:
        if "Tasks not found" not in str(exc):
            raise
        print(
            f"leanformers-eval: error: {exc}. Offline tasks: {', '.join(LOCAL_TASKS)}; "
            "list every task with `leanformers-eval ls tasks`",
            file=sys.stderr,
        )
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
