"""Streaming MPIFA (``mpifa_compress_pretrained``, ``mpifa-compress --stream``) and the activation
offload (``MPIFAConfig.offload``): same output as the in-memory path, bounded host memory, clear errors."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from leanformers import MPIFAConfig, mpifa_compress, save_compressed
from leanformers.compressors.mpifa import mpifa_compress_pretrained
from tests.tiny_models import llama_config, random_ids

CALIB = random_ids(4, 32, seed=1)


def _sharded_llama(folder: Path, *, tied: bool, layers: int = 3) -> Path:
    torch.manual_seed(0)
    cfg = llama_config(64, 96, layers, heads=4, kv_heads=2, tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) > 3  # really several shards
    return folder


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        out.update(load_file(file))
    return out


def _assert_same_folder(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not differ, f"tensors differ: {differ[:5]}"
    for name in ("config.json", "generation_config.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


@pytest.mark.parametrize(
    "tied, planning, offload",
    [
        (False, {}, "none"),
        (True, {"owl": True}, "disk"),
        (False, {}, "cpu"),
        (False, {"allocation": "spectrum"}, "disk"),
    ],
    ids=["untied", "tied-owl-disk", "untied-cpu", "untied-spectrum-disk"],
)
def test_streaming_output_is_identical_to_the_in_memory_path(tmp_path, tied, planning, offload):
    src = _sharded_llama(tmp_path / "src", tied=tied)
    config = MPIFAConfig(density=0.5, device="cpu", batch_size=2, **planning)

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    mem_report = mpifa_compress(model, None, config, calibration=CALIB, progress=False)
    save_compressed(model, None, tmp_path / "mem")

    streamed = dataclasses.replace(config, offload=offload)
    report = mpifa_compress_pretrained(
        src, tmp_path / "stream", streamed, calibration=CALIB, max_shard_size="40KB", progress=False
    )
    assert len(list((tmp_path / "stream").glob("*.safetensors"))) > 1
    _assert_same_folder(tmp_path / "mem", tmp_path / "stream")
    assert [m.rank for m in report.modules] == [m.rank for m in mem_report.modules]
    assert report.model_params_after == mem_report.model_params_after
    assert report.peak_host_rss_bytes > 0

    ids = random_ids(2, 16, seed=3)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "mem")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_activation_offload_gives_bit_identical_models():
    from tests.tiny_models import tiny_llama

    states = {}
    for offload in ("none", "cpu", "disk"):
        model = tiny_llama(layers=2)
        config = MPIFAConfig(density=0.5, device="cpu", batch_size=3, offload=offload)
        mpifa_compress(model, None, config, calibration=CALIB, progress=False)
        states[offload] = model.state_dict()
    for offload in ("cpu", "disk"):
        assert states[offload].keys() == states["none"].keys()
        assert all(torch.equal(states[offload][k], states["none"][k]) for k in states["none"]), offload


def test_offload_settings_are_checked():
    with pytest.raises(ValueError, match="offload must be one of \\('none', 'cpu', 'disk'\\), got 'gpu'"):
        MPIFAConfig(offload="gpu")
    with pytest.raises(ValueError, match="offload_folder is only used with offload='disk'"):
        MPIFAConfig(offload="cpu", offload_folder="/tmp")
    with pytest.warns(FutureWarning, match="offload_streams is deprecated"):
        assert MPIFAConfig(offload_streams=True).offload == "cpu"


def test_streaming_refuses_clearly(tmp_path):
    src = _sharded_llama(tmp_path / "src", tied=False, layers=1)
    config = MPIFAConfig(density=0.5, device="cpu", batch_size=2)

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="exists and is not empty: pass overwrite=True"):
        mpifa_compress_pretrained(src, out, config, calibration=CALIB, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((src / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(
        FileNotFoundError, match=r"needs safetensors weights .* found \['config.json', 'pytorch_model.bin'\]"
    ):
        mpifa_compress_pretrained(pickled, tmp_path / "o1", config, calibration=CALIB, progress=False)
    with pytest.raises(FileNotFoundError, match="reads a local model folder"):
        mpifa_compress_pretrained(tmp_path / "nope", tmp_path / "o2", config, calibration=CALIB)

    # an already compressed folder is refused before any block is compressed
    mpifa_compress_pretrained(src, tmp_path / "c", config, calibration=CALIB, progress=False)
    with pytest.raises(ValueError, match="already MPIFA-compressed"):
        mpifa_compress_pretrained(tmp_path / "c", tmp_path / "o3", config, calibration=CALIB)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


# The child measures its own peak RSS (kernel high-water mark, reset before each call). glibc is told to
# return every freed buffer of 1 MiB or more at once (fixed mmap threshold) so that the peak shows live
# memory, not heap fragmentation from the fp64 solver temporaries (a few MB of noise otherwise).
_RSS_CHILD = """
import json, shutil, sys, torch
from pathlib import Path
from leanformers import MPIFAConfig
from leanformers.compressors.mpifa import mpifa_compress_pretrained

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

root = Path(sys.argv[1])
config = MPIFAConfig(density=0.5, device="cpu", batch_size=2, steps=1, offload="disk")
calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
growth = {}
for name in ("one", "one", "deep"):  # the first run pays the lazy imports and initialisations
    shutil.rmtree(root / "out", ignore_errors=True)
    base = kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    report = mpifa_compress_pretrained(root / name, root / "out", config, calibration=calib, progress=False)
    growth[name] = (kib("VmHWM") - base) * 1024
    growth[name + " (report)"] = report.peak_host_rss_bytes - base * 1024
print(json.dumps(growth))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc (VmHWM reset)")
def test_streaming_host_memory_does_not_grow_with_depth(tmp_path):
    """Peak RSS growth of a 5-block model <= that of a 1-block model of the same shapes (the fixed
    overhead: non-block weights, one block, the solver's fp64 Grams) + 2 blocks' weights; a path that
    held the model would exceed it by 2 blocks."""
    hidden = inter = 512
    for name, layers in (("one", 1), ("deep", 5)):
        torch.manual_seed(0)
        cfg = llama_config(hidden, inter, layers, heads=4, kv_heads=2, vocab=256, tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(tmp_path / name, max_shard_size="2MB")
    # float32 weights of one block: q and o (h x h), k and v (h/2 x h: 2 of 4 heads), gate/up/down (h x i)
    block_bytes = 4 * (3 * hidden * hidden + 3 * hidden * inter)
    script = tmp_path / "child.py"
    script.write_text(_RSS_CHILD)
    out = run_fresh_script(script, tmp_path)
    growth = json.loads(out.strip().splitlines()[-1])
    assert growth["deep"] - growth["one"] <= 2 * block_bytes, (growth, block_bytes)
    # the report's own peak agrees with the independent measurement (same kernel counter)
    assert abs(growth["deep (report)"] - growth["deep"]) <= 2**20


def run_fresh_script(script: Path, root: Path) -> str:
    """Run ``script root`` in a fresh interpreter with a fixed glibc mmap threshold; returns stdout."""
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT, fresh_env

    env = fresh_env(MALLOC_MMAP_THRESHOLD_="1048576", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script), str(root)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout
