"""One command for the GPU rows of docs/benchmarks.md and issue 11's experiments at GPU sizes (one H200).

    PYTHONPATH=src python3 bench/gpu_suite.py              # the GPU run: <= 9 min, results under $OUT
    python bench/gpu_suite.py --dry-run --output-dir DIR   # every part at tiny sizes on the CPU (CI)
    python bench/gpu_suite.py --list                       # the parts, expected times and caps

The parts are rows of bench/rows/gpu_suite.yaml, in run order: each calls a bench runner's ``main`` in
this process (its ``gpu`` or ``dry`` arguments) under the part's time cap. A part that fails or hits
its cap records the error and the JSON its commands had written, and the suite goes on. The result
(gpu_suite.json, .log, .md) is rewritten after every part, so a run stopped from outside keeps every
finished part; finished parts are kept in a state folder and reused by the next run (``--fresh`` redoes
them). A global budget (``--budget``, 530 s) stops the suite in time: a part starts only with at least
MIN_PART_S left and runs at most until the budget ends. What the device machine lacks (the data, the
model, two pure-Python packages) is carried there by tools/device/carry.py (tools/device/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml
from harness import REPO_ROOT, environment, write_json

from tools.device import carry

PARTS = yaml.safe_load((REPO_ROOT / "bench" / "rows" / "gpu_suite.yaml").read_text())
PART_NAMES = list(PARTS)
STATE_ROOT = REPO_ROOT / ".gpu_suite_state"
DEFAULT_BUDGET_S, SETUP_S = 530.0, 25  # SETUP_S: the estimated setup (join the GGUF, dequantise SmolLM2)
# The dry run checks that every part works, not how fast: on a loaded shared CPU its wall times are
# several times the idle ones, so every part gets one generous cap (--cap still overrides it).
DRY_BUDGET_S, DRY_CAP_S, MIN_PART_S = 1500.0, 600.0, 15.0


class PartTimeout(BaseException):
    """Raised by the alarm at a part's cap (a BaseException: the runners' ``except Exception`` let it by)."""


def alarm(signum, frame):
    raise PartTimeout()


def missing_need(needs: list[str], dry: bool, setup: dict) -> str | None:
    """Why a part cannot run here (None: it can): the model did not set up, or a module does not import."""
    if "smollm2" in needs and not dry and setup.get("status") != "ok":
        return f"SmolLM2-135M unavailable: {setup.get('error')}"
    missing = [m for m in needs if m != "smollm2" and importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not importable on this machine (carry the wheels to run it)"
    return None


def run_part(name: str, part: dict, dry: bool, scratch: Path) -> dict:
    """The part's commands (``python bench/<runner>.py ARGS --output JSON``), each in this process; returns
    the commands and the kept keys of each command's result JSON."""
    module, out = importlib.import_module(part["runner"]), {"commands": [], "results": []}
    for i, argv in enumerate(part["dry" if dry else "gpu"]):
        path = scratch / f"{name}_{i}.json"
        argv = [str(a) for a in argv] + ["--output", str(path)]
        out["commands"].append(f"python bench/{part['runner']}.py {' '.join(argv)}")
        print(f"\n$ {out['commands'][-1]}", flush=True)
        module.main(argv)
        payload = json.loads(path.read_text())
        missing = [k for k in part["keep"] if k not in payload]
        if missing:
            raise KeyError(f"part {name}: {path.name} has no {missing}")
        out["results"].append({k: payload[k] for k in part["keep"]})
    return out


class Tee:
    """Writes to a stream and to the log."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.log.write(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = [f"# GPU suite{' (dry run, CPU, tiny sizes)' if payload['dry_run'] else ''}", ""]
    versions = f"torch {env['torch']}, transformers {env['transformers']}"
    lines.append(f"{env.get('gpu') or env.get('device')}; {versions}")
    lines += [f"commit {payload['commit']}; {env['date']}; total {payload['seconds']:.0f} s", ""]
    lines += ["| part | status | seconds | expected | cap | note |", "|---|---|---|---|---|---|"]
    for name, r in payload["parts"].items():
        note = (str(r.get("reason") or r.get("error") or "").splitlines() or [""])[0][:120]
        row = [name, r["status"], f"{r.get('seconds', 0):.0f}", r["expected_s"], r["cap_s"], note]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines) + "\n"


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with contextlib.suppress(Exception):
            torch._dynamo.reset()  # compiled graphs of one part are not the next one's


def setup(dry: bool) -> dict:
    """The carried inputs put to use; SmolLM2 found or joined and converted (not needed by the dry run)."""
    t0, out = time.perf_counter(), {"status": "ok", "source": "not needed (tiny models)"}
    carry.activate()
    if not dry:
        try:
            out.update(carry.provide_smollm2())
        except Exception as exc:  # recorded; the parts that need the model are skipped with it
            out = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
    return out | {"seconds": time.perf_counter() - t0}


def run_one(name: str, part: dict, cap: float, dry: bool, state_dir: Path) -> dict:
    """One part under its cap: its entry (status, seconds, commands, results or error and partial JSON)."""
    scratch = state_dir / name
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    entry, t0 = {}, time.perf_counter()
    print(f"\n== {name} ({part['what']}): expected {part['expected_s']} s, cap {cap:.0f} s", flush=True)
    signal.setitimer(signal.ITIMER_REAL, cap)
    try:
        entry = {"status": "ok", **run_part(name, part, dry, scratch)}
    except PartTimeout:
        entry = {"status": "timeout", "error": f"stopped at its cap of {round(cap, 1):g} s"}
    except Exception as exc:
        entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        entry["traceback"] = traceback.format_exc()
        traceback.print_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if entry["status"] != "ok":  # what the commands had saved before the stop
        saved = {}
        for path in sorted(scratch.glob("*.json")):
            with contextlib.suppress(ValueError):
                saved[path.name] = json.loads(path.read_text())
        entry |= {"partial": saved} if saved else {}
    entry |= {"seconds": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"== {name}: {entry['status']} in {entry['seconds']:.1f} s", flush=True)
    return entry | {"dry_run": dry}


def run_suite(args) -> dict:
    dry, device = args.dry_run, "cpu" if args.dry_run else "cuda"
    out_dir = Path(args.output_dir or os.environ.get("OUT") or REPO_ROOT / "bench" / "results" / "gpu_suite")
    state_dir = Path(args.state_dir) if args.state_dir else STATE_ROOT / ("dry" if dry else "gpu")
    if args.fresh:
        shutil.rmtree(state_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_path = state_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    caps = {name: DRY_CAP_S if dry else p["cap_s"] for name, p in PARTS.items()}
    caps |= {n: float(s) for n, _, s in (c.partition("=") for c in args.cap or [])}
    budget = args.budget if args.budget is not None else (DRY_BUDGET_S if dry else DEFAULT_BUDGET_S)
    start, log = time.perf_counter(), open(out_dir / "gpu_suite.log", "a", encoding="utf-8")  # noqa: SIM115
    old_out, old_err, old_handler = sys.stdout, sys.stderr, signal.signal(signal.SIGALRM, alarm)
    sys.stdout, sys.stderr = Tee(old_out, log), Tee(old_err, log)
    payload = {"dry_run": dry, "environment": environment(device), "budget_s": budget, "parts": {}}
    payload["commit"] = carry.git_commit() or carry.carried_commit()
    payload["command"] = f"python bench/gpu_suite.py {' '.join(args.argv)}"

    def save():
        payload["seconds"] = time.perf_counter() - start
        write_json(out_dir / "gpu_suite.json", payload)
        (out_dir / "gpu_suite.md").write_text(markdown(payload))
        write_json(state_path, state)

    try:
        where = "dry run" if dry else device
        print(f"GPU suite ({where}): {args.parts}; budget {budget:.0f} s; out {out_dir}")
        payload["setup"] = setup(dry)
        payload["data"] = os.environ.get("LEANFORMERS_DATA") or "../shared/data"
        save()
        for name in args.parts:
            part, prev = PARTS[name], state.get(name)
            entry = {"what": part["what"], "expected_s": part["expected_s"], "cap_s": caps[name]}
            left = budget - (time.perf_counter() - start)
            reason = missing_need(part.get("needs", []), dry, payload["setup"])
            if reason is None and left < MIN_PART_S:
                reason = f"suite budget spent ({left:.0f} s of {budget:.0f} s left); rerun to resume"
            if prev and prev["status"] == "ok" and prev["dry_run"] == dry and not args.fresh:
                entry |= {**prev, **entry, "status": "reused", "reused_from": prev["date"]}
            elif reason is not None:
                entry |= {"status": "skipped", "reason": reason}
                print(f"\n== {name}: skipped: {reason}", flush=True)
            else:
                entry |= run_one(name, part, min(caps[name], left), dry, state_dir)
                state |= {name: entry} if entry["status"] == "ok" else {}
                free(device)
            payload["parts"][name] = entry
            save()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        save()
        print(markdown(payload))
        print(f"results: {out_dir / 'gpu_suite.json'}, log: {out_dir / 'gpu_suite.log'}")
        sys.stdout, sys.stderr = old_out, old_err
        log.close()
    return payload


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every part at tiny sizes on the CPU (CI)")
    ap.add_argument("--output-dir", default=None, help="where the JSON, log and summary go (default $OUT)")
    ap.add_argument("--state-dir", default=None, help=f"resume state and raw JSON (default {STATE_ROOT}/...)")
    ap.add_argument("--parts", nargs="+", choices=PART_NAMES, default=PART_NAMES, metavar="PART")
    ap.add_argument("--budget", type=float, help=f"seconds for the suite ({DEFAULT_BUDGET_S:g})")
    ap.add_argument("--cap", nargs="+", metavar="PART=SECONDS", help="override a part's cap")
    ap.add_argument("--fresh", action="store_true", help="redo the parts the state folder holds as done")
    ap.add_argument("--list", action="store_true", help="print the parts and exit")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    unknown = [c for c in args.cap or [] if c.partition("=")[0] not in PARTS]
    if unknown:
        raise SystemExit(f"--cap {unknown}: unknown part; choose from {', '.join(PART_NAMES)}")
    if args.list:
        for name, p in PARTS.items():
            print(f"{name:16} expected {p['expected_s']:4d} s  cap {p['cap_s']:4d} s  {p['what']}")
        return {"parts": PART_NAMES}
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the GPU suite needs one; on a CPU run it with --dry-run")
    return run_suite(args)


if __name__ == "__main__":
    main()
