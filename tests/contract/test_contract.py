"""Runs every row of the contract table (tests/contract/table.py explains the table)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.contract.checks import CHECKS, inputs_for, logits_of, make_trainer, prunes, wrap
from tests.contract.table import DDP_OP, FSDP2_OP, PERSIST_OPS, ROWS, Row

REPO = Path(__file__).resolve().parents[2]
UNCLEAR = ("KeyError", "AttributeError", "IndexError")  # errors that name no problem and no fix


class Recorded(Exception):
    """An exception raised in another process (fresh reload, DDP worker), by class names."""

    def __init__(self, names: list[str], message: str):
        super().__init__(message)
        self.names = names


def _subprocess_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # the caller's PYTHONPATH first: the subprocesses must run the same leanformers as this process
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(REPO / "src"), str(REPO)) if p)
    return env


def expect(row: Row, work) -> None:
    """Run ``work``: it must pass, or refuse exactly as the row declares, with a clear error."""
    try:
        work()
    except Exception as exc:
        names = exc.names if isinstance(exc, Recorded) else [c.__name__ for c in type(exc).__mro__]
        if row.refuses is None:
            raise
        kind, fragment = row.refuses
        assert kind in names, f"{row.id}: expected {kind}, got {names[0]}: {exc}"
        assert fragment in str(exc), f"{row.id}: refusal message lacks {fragment!r}: {exc}"
        assert names[0] not in UNCLEAR and len(str(exc)) >= 30, f"{row.id}: unclear error {names[0]}: {exc}"
        return
    if row.refuses is not None:
        pytest.fail(f"{row.id}: expected a refusal {row.refuses}, but the operation went through")


# ----------------------------------------------------------------------------- batched fixtures


def _save_row(row: Row, folder: Path, inputs_file: Path) -> dict:
    """Build, train (when it trains) and save one persistence row; its manifest entry for the reload."""
    from safetensors.torch import save_file

    from leanformers import save_compressed

    model, callbacks = wrap(row)
    if callbacks:
        make_trainer(model, callbacks, row, folder.parent / f"{folder.name}.train", max_steps=2).train()
    inputs = inputs_for(row.family.task)
    save_file(inputs, str(inputs_file))
    entry = dict(key=row.id, folder=str(folder), inputs=str(inputs_file), import_leanformers=True, kwargs={})
    if row.method.kind == "sst" and row.op == "persist":
        ref = logits_of(model, inputs)
        model.save_pretrained(folder)
        entry.update(loader="peft", builder=row.family.builder, seed=row.method.reload_seed)
    elif row.op == "persist_merged":
        merged = model.merge_and_unload()
        ref = logits_of(merged, inputs)
        merged.save_pretrained(folder)
        entry.update(loader=row.family.auto_class)
    elif row.method.kind == "dst":
        ref = logits_of(model, inputs)
        model.save_pretrained(folder)
        entry.update(loader=row.family.auto_class)
    else:  # a compressor
        save_compressed(model, None, folder)
        if prunes(row):  # pruned weights in plain tensors: reloads in a process without leanformers
            entry.update(import_leanformers=False)
        if row.op == "persist_base":  # AutoModel: the bare base model of a task checkpoint
            ref = logits_of(model.base_model, inputs)
            entry.update(loader="AutoModel")
        else:
            ref = logits_of(model, inputs)
            entry.update(loader=row.family.auto_class)
        if row.op == "persist_noimport":  # a user process without `import leanformers`
            entry.update(import_leanformers=False, kwargs={"ignore_mismatched_sizes": True})
    save_file({"out": ref.contiguous()}, str(folder.parent / f"{folder.name}.ref.safetensors"))
    return entry


@pytest.fixture(scope="session")
def reloaded(tmp_path_factory):
    """Save every persistence row in this process, reload them all in ONE fresh process."""
    root = tmp_path_factory.mktemp("contract_persist")
    manifest, outcome = [], {}
    for row in ROWS:
        if row.op not in PERSIST_OPS:
            continue
        try:
            manifest.append(_save_row(row, root / row.id, root / f"{row.id}.inputs.safetensors"))
        except Exception as exc:
            outcome[row.id] = {"error": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}
    (root / "manifest.json").write_text(json.dumps(manifest))
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests/contract/fresh_reload.py"),
            str(root / "manifest.json"),
            str(root / "r.json"),
        ],
        cwd=REPO,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    outcome.update(json.loads((root / "r.json").read_text()))
    return root, outcome


def _dist_reports(tmp_path_factory, op: str, port: int) -> dict:
    """Every ``op`` row in ONE 2-process gloo launch of dist_worker.py."""
    out = tmp_path_factory.mktemp(f"contract_{op}") / "reports.json"
    ids = [row.id for row in ROWS if row.op == op]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += [str(REPO / "tests/contract/dist_worker.py"), str(out), *ids]
    proc = subprocess.run(cmd, cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = json.loads(out.read_text())
    assert reports["_world_size"] == 2
    return reports


@pytest.fixture(scope="session")
def ddp_reports(tmp_path_factory):
    return _dist_reports(tmp_path_factory, DDP_OP, 29547)


@pytest.fixture(scope="session")
def fsdp2_reports(tmp_path_factory):
    return _dist_reports(tmp_path_factory, FSDP2_OP, 29548)


# ----------------------------------------------------------------------------- the rows


def _params(op: str) -> list:
    return [pytest.param(r, id=r.id) for r in ROWS if r.op == op or (op == "*" and r.op in CHECKS)]


@pytest.mark.parametrize("row", _params("*"))
def test_row(row: Row, tmp_path):
    torch.manual_seed(0)
    expect(row, lambda: CHECKS[row.op](row, tmp_path))


@pytest.mark.parametrize("row", [p for op in PERSIST_OPS for p in _params(op)])
def test_persist_row(row: Row, reloaded):
    """save -> fresh-process from_pretrained gives identical outputs."""
    from safetensors.torch import load_file

    root, outcome = reloaded

    def check():
        result = outcome[row.id]
        if row.op == "persist_noimport":
            # Without `import leanformers` transformers cannot build the compressed layers. The contract:
            # never silent. It raises naming leanformers, or (ignore_mismatched_sizes=True, whose
            # re-initialisation no checkpoint can veto: docs/pifa_format.md) its load report names it.
            said = result.get("message", "") + result.get("log", "")
            assert re.search(r"import[ _]leanformers", said), (
                f"loaded without import leanformers and said nothing: {said[-2000:]}"
            )
            return
        if "error" in result:
            raise Recorded(result["error"], result["message"])
        ref = load_file(str(root / f"{row.id}.ref.safetensors"))["out"]
        got = load_file(result["ok"])["out"]
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)

    expect(row, check)


def _check_rank_agreement(row: Row, report: dict, wrapper: str, wrong_wrapper: str) -> None:
    """What every 2-process row asserts: the recorded error re-raised, or 6 steps under ``wrapper``
    with the method state changed as the method says and parameters / state identical on both ranks."""
    if "error" in report:
        raise Recorded(report["error"], report["message"])
    assert report["global_step"] == 6
    assert report["wrapper"] == wrapper, f"{wrong_wrapper}: {report['wrapper']}"
    assert report["state_entries"] > 0
    assert report["state_changed"] == row.method.rewires
    assert report["params_identical"], "(gathered) parameters differ across ranks"
    assert report["state_identical"], "masks / sampled indices differ across ranks"


@pytest.mark.distributed
@pytest.mark.parametrize("row", _params(DDP_OP))
def test_ddp_row(row: Row, ddp_reports):
    """2 gloo processes under the HF Trainer: identical parameters, buffers and masks / indices."""

    def check():
        report = ddp_reports[row.id]
        _check_rank_agreement(row, report, "DistributedDataParallel", "the Trainer did not use DDP")
        assert report["buffers_identical"], "buffers differ across ranks"
        if row.method.kind == "sst":  # SST keeps its buffers identical itself: no per-forward broadcast
            assert report["sst_buffers"] > 0
            assert report["sst_buffers_broadcast"] == 0, (
                f"DDP re-broadcasts {report['sst_buffers_broadcast']} SST buffers (U/Vh) before every forward"
            )

    expect(row, check)


@pytest.mark.distributed
@pytest.mark.parametrize("row", _params(FSDP2_OP))
def test_fsdp2_row(row: Row, fsdp2_reports):
    """2 gloo processes, Trainer + FSDP2: sharded weights, identical gathered parameters and method state."""

    def check():
        report = fsdp2_reports[row.id]
        _check_rank_agreement(row, report, "FSDP2", "the parameters are not DTensor shards")
        if row.method.kind == "dst":
            assert report["masks_local"], "a rank holds more than its shard of a mask"
            assert report["zero_outside_masks"], "weights or moments non-zero outside a mask shard"
            assert report["disagreement"] == 0.0, "a rank chose other links than rank 0"

    expect(row, check)


# ----------------------------------------------------------------------------- the table itself

# Issue 7's silent failures, each pinned to the rows that catch it: dropping one is a test failure.
ISSUE_7_ROWS = {
    "SST classifier head trains and is saved": ["sst_ft-bert_cls-train_step", "sst_ft-bert_cls-persist"],
    "SST parameter counts relative to the dense model": ["sst-llama-count", "sst_ft-bert_cls-count"],
    "SST without its controller warns": ["sst-llama-no_controller_warns"],
    "SST inference cache never stale": ["sst-llama-eval", "sst-llama-generate", "sst-bart-generate"],
    "SST under DDP: no per-forward U/Vh broadcast": ["sst-llama-ddp"],
    "delete_adapter: a clear error": ["sst_ft-llama-delete_adapter"],
    "CHTss resume from a moved checkpoint": [
        f"{m}-llama-resume" for m in ("chtss", "chts", "set", "rigl", "mest")
    ],
    "CHTssConfig(method=...) applied or refused": [
        f"{m}-llama-config_method" for m in ("chtss", "chts", "set", "rigl", "mest", "static")
    ],
    "MEST under DDP": ["mest-llama-ddp"],
    "CHTs family under FSDP2 (issue 12)": [
        f"{m}-llama-fsdp2" for m in ("chtss", "chts", "set", "rigl", "mest")
    ],
    "MPIFA AutoModel on a task folder": ["mpifa-llama-persist_base", "mpifa-bert_cls-persist_base"],
    "MPIFA without import leanformers is loud": ["mpifa-llama-persist_noimport"],
    "MPIFA bf16 storage keeps wider coefficients (issue 10)": [
        "mpifa-llama-bf16_storage",
        "mpifa-gpt2-bf16_storage",
    ],
}


def test_table_keeps_every_issue_row_and_every_family():
    from tests.contract.table import FAMILIES, METHODS

    ids = {row.id for row in ROWS}
    missing = {bullet: [r for r in rows if r not in ids] for bullet, rows in ISSUE_7_ROWS.items()}
    assert not {k: v for k, v in missing.items() if v}, missing
    for method in METHODS.values():
        families = method.families or tuple(FAMILIES)
        covered = {row.family.name for row in ROWS if row.method is method}
        assert covered == set(families), (method.name, set(families) - covered)
    batched = set(PERSIST_OPS) | {DDP_OP, FSDP2_OP}
    assert all(row.op in CHECKS or row.op in batched for row in ROWS)


# Issue 22's user-facing paths of CHTss, SST and the recipes, pinned like issue 7's rows.
ISSUE_22_ROWS = {
    "CHTss masks travel with the model (save_model, load_masks, a new run)": [
        f"chtss-{family}-masks_with_model" for family in ("llama", "qwen2", "opt", "gpt2", "bert_cls", "bart")
    ],
    "recipe errors: one line naming the key, exit 2": ["chtss-llama-recipe_errors"],
    "compact SST fine-tuning adapters": [
        f"sst_ft-{family}-compact_adapter" for family in ("llama", "gpt2", "bert_cls", "bart")
    ],
}


def test_table_keeps_issue_22_rows():
    ids = {row.id for row in ROWS}
    missing = {bullet: [r for r in rows if r not in ids] for bullet, rows in ISSUE_22_ROWS.items()}
    assert not {k: v for k, v in missing.items() if v}, missing
