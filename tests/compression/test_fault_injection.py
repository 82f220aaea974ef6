"""A real ``leanformers-compress`` process killed (SIGKILL) at points of its save (issue 19, acceptance 2):
afterwards the output is absent or complete and reloads exactly, the source is intact, and the next run
tidies what the dead one left. The kill points are environment-guarded (``LEANFORMERS_FAULT_POINT``) and
do nothing otherwise."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.helpers import REPO_ROOT, fresh_env, mpifa_cli_args

pytestmark = pytest.mark.slow


def _run(args, fault=None):
    env = fresh_env(**({"LEANFORMERS_FAULT_POINT": fault} if fault else {}))
    cmd = [sys.executable, "-m", "leanformers.compression.cli", *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def _digest(folder):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def _tensors(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def reference(tiny_lm_folder, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    proc = _run(mpifa_cli_args(tiny_lm_folder, out, shared_data))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _tensors(out)


@pytest.mark.parametrize(
    "fault, stream, existing",
    [
        ("after-staging-weights", False, False),
        ("after-old-moved-aside", False, True),  # the riskiest moment: the old output is aside
        ("after-block-0", True, False),
        ("before-rename", True, False),
    ],
)
def test_a_killed_save_leaves_the_output_absent_or_complete(
    fault, stream, existing, reference, tiny_lm_folder, shared_data, tmp_path
):
    source_before = _digest(tiny_lm_folder)
    out = tmp_path / "out"
    extra = ["--stream"] if stream else []
    if existing:  # a previous output that --overwrite is replacing
        assert _run(mpifa_cli_args(tiny_lm_folder, out, shared_data, "--density", "0.6")).returncode == 0
        previous = _tensors(out)
        extra.append("--overwrite")
    proc = _run(mpifa_cli_args(tiny_lm_folder, out, shared_data, *extra), fault=fault)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    assert _digest(tiny_lm_folder) == source_before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    if out.exists():
        got = _tensors(out)
        expected = previous  # killed before the new output was published: the old one, untouched
        assert got.keys() == expected.keys() and all((got[k] == expected[k]).all() for k in got)
    if not existing:  # what the next run does first (clean_stale), checked without a whole run
        from leanformers.folders import clean_stale

        clean_stale(out)
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], leftovers
        return
    # the killed run had moved the old output aside: the next run (same command) puts it back, then
    # replaces it and leaves nothing behind
    assert any(".out.old~" in name for name in leftovers) and not out.exists()
    rerun = _run(mpifa_cli_args(tiny_lm_folder, out, shared_data, *extra))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    got = _tensors(out)
    assert got.keys() == reference.keys() and all((got[k] == reference[k]).all() for k in got)


def test_the_same_command_writes_byte_identical_safetensors(tiny_lm_folder, shared_data, tmp_path):
    """Issue 19 #14b: two separate processes, caches cleared, same inputs: the same bytes."""
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        env_cache = tmp_path / f"cache{i}"
        args = mpifa_cli_args(tiny_lm_folder, out, shared_data)
        proc = subprocess.run(
            [sys.executable, "-m", "leanformers.compression.cli", *args],
            cwd=REPO_ROOT,
            env=fresh_env(LEANFORMERS_CACHE=str(env_cache)),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(out)
    a, b = _digest(outs[0]), _digest(outs[1])
    assert [n for n in a if n.endswith(".safetensors")] and {
        k: v for k, v in a.items() if k.endswith(".safetensors")
    } == {k: v for k, v in b.items() if k.endswith(".safetensors")}
