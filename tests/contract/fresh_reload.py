"""Fresh-process reloads of the contract table, batched: one process reloads every saved row.

Usage: python tests/contract/fresh_reload.py MANIFEST.json RESULTS.json

MANIFEST: list of {key, folder, loader ("peft" | Auto class name), builder, seed, inputs (safetensors
file), import_leanformers, kwargs}. Rows with ``import_leanformers: false`` run first, before anything
imports leanformers (what a user's process without ``import leanformers`` sees). RESULTS: key ->
{"ok": outputs file} or {"error": [exception class names of the MRO], "message": str}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class _Capture:
    """What a user sees while loading: warnings, transformers' log records, stdout/stderr."""

    def __enter__(self):
        import contextlib
        import io
        import logging
        import warnings

        self.buf = io.StringIO()
        self.records: list[str] = []
        outer = self

        class Handler(logging.Handler):
            def emit(self, record):
                outer.records.append(record.getMessage())

        self.handler = Handler(level=logging.INFO)
        logging.getLogger("transformers").addHandler(self.handler)
        self.warn = warnings.catch_warnings(record=True)
        self.caught = self.warn.__enter__()
        warnings.simplefilter("always")
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(contextlib.redirect_stdout(self.buf))
        self.stack.enter_context(contextlib.redirect_stderr(self.buf))
        return self

    def __exit__(self, *exc):
        import logging

        self.stack.close()
        self.warn.__exit__(*exc)
        logging.getLogger("transformers").removeHandler(self.handler)
        return False

    def text(self) -> str:
        if not hasattr(self, "buf"):
            return ""
        return "\n".join([self.buf.getvalue(), *self.records, *(str(w.message) for w in self.caught)])


def _outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _load(entry):
    import transformers

    if entry["loader"] == "peft":
        from peft import PeftModel

        import leanformers  # noqa: F401  (registers the sst tuner)
        from tests import tiny_models

        base = getattr(tiny_models, entry["builder"])(seed=entry["seed"])
        return PeftModel.from_pretrained(base, entry["folder"])
    if entry["import_leanformers"]:
        import leanformers  # noqa: F401  (registers the mpifa quantizer)
    auto = getattr(transformers, entry["loader"])
    return auto.from_pretrained(entry["folder"], **entry.get("kwargs", {}))


def main(manifest: str, results_path: str) -> None:
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    entries = json.loads(Path(manifest).read_text())
    entries.sort(key=lambda e: bool(e["import_leanformers"]))  # the no-import rows first
    results = {}
    for entry in entries:
        if not entry["import_leanformers"]:
            assert "leanformers" not in sys.modules, "a no-import row ran after leanformers was imported"
        log = _Capture()
        try:
            with log:
                model = _load(entry)
            out = _outputs(model, load_file(entry["inputs"]))
            path = str(Path(entry["folder"]).parent / f"{Path(entry['folder']).name}.reloaded.safetensors")
            save_file({"out": out.contiguous()}, path)
            results[entry["key"]] = {"ok": path, "log": log.text()}
        except Exception as exc:  # recorded and judged by the row's expectation
            names = [c.__name__ for c in type(exc).__mro__]
            results[entry["key"]] = {"error": names, "message": f"{exc}", "log": log.text()}
    Path(results_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
