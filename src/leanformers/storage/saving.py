"""Saving compressed checkpoints: an atomic safetensors-only write, and the load guard that makes a process
without ``import leanformers`` fail loudly instead of loading compressed modules as wrong dense ones.

* ``save_compressed`` writes a normal Hugging Face folder: safetensors shards and a config.json
  whose ``quantization_config`` (``quant_method: "mpifa"``) lists every compressed module's spec
  (kind, shape, rank, form, bias), staged beside the target and renamed into place.
* The guard: without the registered quantizer transformers only warns "Unknown quantization type" and
  would build dense nn.Linear modules. Every compressed module stores its pivot block (or U) under
  the dense name ``weight`` with a non-dense shape, so that load fails with transformers' size
  mismatch error instead of silently returning random weights; ``save_compressed`` refuses the
  only layouts where the shapes could coincide (full-rank modules).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from leanformers._compat import is_conv1d
from leanformers.folders import check_output, fault_point, replace_folder, staging_folder
from leanformers.storage.integration import compressed_modules, dense_skeleton
from leanformers.storage.layers import PIFALinear, module_from_spec
from leanformers.storage.quantization_config import MPIFAQuantizationConfig
from leanformers.storage.sparsity import SPARSITY_KEY, check_pattern

__all__ = [
    "PICKLE_SUFFIXES",
    "check_guard",
    "check_safetensors_only",
    "save_compressed",
    "source_folders",
    "write_extras",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def check_safetensors_only(files) -> None:
    """Refuse to load a checkpoint whose weight files are not all safetensors (pickles run code)."""
    pickled = [f for f in files if not str(f).endswith(".safetensors")]
    if pickled:
        raise ValueError(
            f"MPIFA checkpoints are read from safetensors only, found {pickled}: re-save with save_compressed()"
        )


def _stores_dense_weight(module: nn.Module, original: nn.Module | None) -> bool:
    """True when ``module.weight`` IS the dense Linear weight of the architecture: a full-rank PIFA layer
    with identity pivot order (sorted pivots, nothing permuted), replacing an nn.Linear (not a
    transposed Conv1D). A process without leanformers then loads that module correctly."""
    if not isinstance(module, PIFALinear) or module.input_permuted:
        return False
    if module.rank != min(module.in_features, module.out_features) or (
        original is not None and is_conv1d(original)
    ):
        return False
    index = module.gather_index.detach().cpu()
    return bool(torch.equal(index, torch.arange(index.numel(), dtype=index.dtype)))


def check_guard(model: nn.Module, modules: dict[str, nn.Module], skeleton: nn.Module | None = None) -> None:
    """A process without the registered quantizer must either load each compressed module correctly or
    fail: its ``weight`` must differ in shape from the dense parameter of that name (size mismatch
    error), or be exactly the dense weight (full-rank PIFA in identity order). ``skeleton``: the dense
    model on meta when the caller already built it (the streaming mode checks block by block)."""
    skeleton = skeleton if skeleton is not None else dense_skeleton(model)
    dense = {} if skeleton is None else {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    clashes = []
    for name, module in modules.items():
        dense_shape = dense.get(f"{name}.weight", (module.out_features, module.in_features))
        if tuple(module.weight.shape) != dense_shape:
            continue
        original = skeleton.get_submodule(name) if skeleton is not None else None
        if not _stores_dense_weight(module, original):
            clashes.append(f"{name} (rank {module.rank} of {module.out_features}x{module.in_features})")
    if clashes:
        raise ValueError(
            "these modules are stored at full rank in a layout whose tensor has the dense weight's shape but not "
            f"its values, so a process without `import leanformers` would load them silently wrong: {', '.join(clashes)}. "
            "Keep them dense (replace them by module.to_dense()) or lower their rank."
        )


def save_compressed(
    model: nn.Module,
    tokenizer,
    output_dir: str | os.PathLike,
    quantization_config: MPIFAQuantizationConfig | dict | None = None,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    model_card: str | None = None,
) -> Path:
    """Write the output of any compressor as a Hugging Face folder (safetensors, config.json, tokenizer,
    optional README.md model card), atomically.

    Compressed layers (PIFALinear / LowRankLinear) go with the ``mpifa`` quantization_config, whose
    ``modules`` are taken from the model (a given config that lists other modules or other layouts is an
    error); pruned models (N:M sparsity) are plain checkpoints whose ``config.sparsity`` record is
    checked against the weights. The folder is written beside
    ``output_dir`` and renamed into place (leanformers.folders: files fsynced first, leftovers of
    interrupted runs tidied); an existing non-empty ``output_dir`` is refused unless ``overwrite=True``
    (``--overwrite``), and so is an output that holds, is or lies inside the folder the model was loaded
    from. Returns the folder.
    """
    output_dir = Path(output_dir).absolute()
    protected = source_folders(model)
    check_output(output_dir, overwrite=overwrite, protected=protected)
    modules = compressed_modules(model)
    sparsity = getattr(model.config, SPARSITY_KEY, None)
    if modules:
        model.config.quantization_config = _quantization_config_of(model, modules, quantization_config)
    elif sparsity is not None:
        check_pattern(model, sparsity)  # pruned weights stay in their dense tensors: check the zeros
    else:
        raise ValueError(
            "the model has no compressed module (PIFALinear / LowRankLinear) and no semi-structured "
            "sparsity record: compress it first (leanformers.compress / mpifa_compress)"
        )
    staging = staging_folder(output_dir)
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        write_extras(staging, tokenizer, model_card)
        fault_point("after-staging-weights")
        replace_folder(staging, output_dir, overwrite=overwrite, protected=protected)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def source_folders(model: nn.Module) -> list[Path]:
    """The local folder the model was loaded from (protected from being overwritten by its own output)."""
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return [Path(name)] if name and Path(name).is_dir() else []


def _quantization_config_of(
    model, modules: dict[str, nn.Module], quantization_config
) -> MPIFAQuantizationConfig:
    """The ``quantization_config`` to save: the given or the model's one, with every module's spec taken
    from the model (a given config that lists other modules or layouts is an error)."""
    specs = {name: m.spec() for name, m in modules.items()}
    if quantization_config is None:
        quantization_config = getattr(model.config, "quantization_config", None)
    if isinstance(quantization_config, dict):
        quantization_config = MPIFAQuantizationConfig.from_dict(quantization_config)
    if quantization_config is None:
        quantization_config = MPIFAQuantizationConfig()
    if not isinstance(quantization_config, MPIFAQuantizationConfig):
        raise TypeError(
            f"quantization_config must be an MPIFAQuantizationConfig, got {type(quantization_config).__name__}"
        )
    # Normalise the given specs (older writers may omit optional keys such as "input_permuted").
    given = {k: module_from_spec(v, device="meta").spec() for k, v in quantization_config.modules.items()}
    if given and given != specs:
        names = sorted(set(given) | set(specs))
        differ = [k for k in names if given.get(k) != specs.get(k)][:5]
        raise ValueError(
            f"quantization_config.modules does not match the model's compressed modules (first differences: {differ}); "
            "leave `modules` empty to take them from the model"
        )
    quantization_config.modules = specs
    quantization_config.coefficient_dtype = _coefficient_setting(modules)
    check_guard(model, modules)
    return quantization_config


def _coefficient_setting(modules: dict[str, nn.Module]) -> str:
    """The one ``coefficient_dtype`` setting of the PIFA layers (the config holds one for all)."""
    settings = {m.coefficient_dtype for m in modules.values() if isinstance(m, PIFALinear)}
    if len(settings) > 1:
        raise ValueError(
            f"the PIFA layers use different coefficient_dtype settings {sorted(settings)}; a checkpoint "
            "holds one: call leanformers.set_coefficient_dtype_(model, setting) before saving"
        )
    return settings.pop() if settings else "auto"


def write_extras(staging: Path, tokenizer, model_card: str | None) -> None:
    """The tokenizer and model card beside the weights in ``staging``; refuses any pickled file there
    (MPIFA folders hold safetensors only)."""
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    if model_card is not None:
        (staging / "README.md").write_text(model_card, encoding="utf-8")
    pickles = [p.name for p in staging.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise RuntimeError(
            f"refusing to publish pickled files {pickles}; MPIFA folders hold safetensors only"
        )
