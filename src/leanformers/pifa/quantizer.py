"""transformers integration of the MPIFA format: quantization config, HfQuantizer, save / reload.

Lifecycle (the ``quantizers/quantizer_<method>.py`` part of a transformers integration) lives here;
the module swap is ``replace_with_pifa_layers`` (the ``integrations/<method>.py`` part).

* ``save_compressed`` writes a normal Hugging Face folder: safetensors shards and a config.json
  whose ``quantization_config`` (``quant_method: "mpifa"``) lists every compressed module's spec
  (kind, shape, rank, form, bias).
* After ``import leanformers`` the registered ``MPIFAHfQuantizer`` swaps those modules for empty
  PIFALinear / LowRankLinear layers on the meta device before the weights load, so
  ``AutoModelForCausalLM.from_pretrained(folder)`` returns the compressed model exactly.
* The guard: without the registration transformers only warns "Unknown quantization type" and
  would build dense nn.Linear modules. Every compressed module stores its pivot block (or U) under
  the dense name ``weight`` with a non-dense shape, so that load fails with transformers' size
  mismatch error instead of silently returning random weights; ``save_compressed`` refuses the
  only layouts where the shapes could coincide (full-rank modules).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from leanformers._compat import is_conv1d
from leanformers.pifa.layer import LowRankLinear, PIFALinear, module_from_spec

__all__ = [
    "QUANT_METHOD",
    "MPIFAHfQuantizer",
    "MPIFAQuantizationConfig",
    "compressed_modules",
    "dequantize_model",
    "enable_peft_lora",
    "register",
    "replace_with_pifa_layers",
    "resolve_module_names",
    "save_compressed",
]

logger = logging.getLogger(__name__)

QUANT_METHOD = "mpifa"
# Written into every config so that a reader of config.json (or of transformers' "Unknown quantization
# type, got mpifa" warning) learns how to load the folder.
REQUIRES = "leanformers (pip install leanformers; `import leanformers` before from_pretrained)"
COMPRESSED_TYPES = (PIFALinear, LowRankLinear)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class MPIFAQuantizationConfig(QuantizationConfigMixin):
    """``quantization_config`` of an MPIFA checkpoint (serialised into config.json).

    Args:
        modules: module name -> ``layer.spec()`` for every compressed module (ranks live here because
            modules are swapped on the meta device before any weight is read).
        density: target density of the targeted linears; alpha, steps: M settings; calibration: a
            description of the calibration data; leanformers_version: the writer's version;
            extra: free-form JSON-able details (allocation, achieved density, ...).
    """

    def __init__(
        self,
        modules: dict[str, dict] | None = None,
        density: float | None = None,
        alpha: float | None = None,
        steps: int | None = None,
        calibration: str | None = None,
        leanformers_version: str | None = None,
        extra: dict | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        kwargs.pop("requires", None)
        self.quant_method = QUANT_METHOD
        self.modules = {str(k): dict(v) for k, v in (modules or {}).items()}
        self.density = density
        self.alpha = alpha
        self.steps = steps
        self.calibration = calibration
        if leanformers_version is None:
            from leanformers import __version__ as leanformers_version
        self.leanformers_version = leanformers_version
        self.extra = dict(extra or {})
        self.extra.update(kwargs)  # unknown keys of a newer writer survive a round trip
        self.post_init()

    def post_init(self) -> None:
        if not isinstance(self.modules, dict):
            raise TypeError(f"modules must be a dict name -> spec, got {type(self.modules).__name__}")
        for name, spec in self.modules.items():
            if not isinstance(spec, dict) or spec.get("kind") not in ("pifa", "lowrank"):
                raise ValueError(
                    f"quantization_config.modules[{name!r}] = {spec!r} is not a PIFA/low-rank spec: "
                    "build it with PIFALinear.spec() / LowRankLinear.spec()"
                )
        if self.density is not None and not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "requires": REQUIRES,
            "modules": {k: dict(v) for k, v in self.modules.items()},
            "density": self.density,
            "alpha": self.alpha,
            "steps": self.steps,
            "calibration": self.calibration,
            "leanformers_version": self.leanformers_version,
            "extra": json.loads(json.dumps(self.extra, default=str)),
        }

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @property
    def ranks(self) -> dict[str, int]:
        return {name: int(spec["rank"]) for name, spec in self.modules.items()}


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def resolve_module_names(model: nn.Module, modules: dict[str, dict]) -> dict[str, dict]:
    """``modules`` keyed by names that exist in ``model``.

    A checkpoint written from a model with a head (``LlamaForCausalLM``: ``model.layers.0...``) may be
    loaded into its base model (``AutoModel`` -> ``LlamaModel``: ``layers.0...``) and the other way
    round; transformers maps the weight names with ``base_model_prefix``, so the spec names are mapped
    the same way. A name that resolves neither way is an error naming the module.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    resolved: dict[str, dict] = {}
    for name, spec in modules.items():
        candidates = [name]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1 :])  # head checkpoint -> base model
        if prefix and hasattr(model, prefix):
            candidates.append(f"{prefix}.{name}")  # base checkpoint -> model with a head
        found = next((c for c in candidates if _has_module(model, c)), None)
        if found is None:
            raise ValueError(
                f"the model has no module {name!r} listed in quantization_config.modules: the checkpoint "
                f"was written for another architecture than {type(model).__name__}"
            )
        resolved[found] = spec
    return resolved


def replace_with_pifa_layers(model: nn.Module, modules: dict[str, dict]) -> nn.Module:
    """Swap each named nn.Linear / Conv1D of ``model`` for an empty layer built from its spec, on the
    module's own device and dtype (works on meta). Modules already of the right layout are kept.
    Names are resolved with ``resolve_module_names`` (head <-> base model prefix)."""
    for name, spec in resolve_module_names(model, modules).items():
        old = model.get_submodule(name)
        if isinstance(old, COMPRESSED_TYPES):
            if old.spec() != module_from_spec(spec, device="meta").spec():
                raise ValueError(f"module {name!r} is {old.spec()} but the config asks for {spec}")
            continue
        if isinstance(old, nn.Linear):
            shape = (old.out_features, old.in_features)
        elif is_conv1d(old):  # GPT-2 Conv1D: weight (in, out), replaced by a Linear-layout layer
            shape = (old.nf, old.weight.shape[0])
        else:
            raise TypeError(
                f"module {name!r} is a {type(old).__name__}; only nn.Linear and Conv1D can be replaced"
            )
        if shape != (int(spec["out_features"]), int(spec["in_features"])):
            raise ValueError(
                f"module {name!r} has (out, in) = {shape} but quantization_config.modules says "
                f"({spec['out_features']}, {spec['in_features']})"
            )
        new = module_from_spec(spec, dtype=old.weight.dtype, device=old.weight.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> PIFALinear / LowRankLinear of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, COMPRESSED_TYPES)}


def _dense_skeleton(model: nn.Module) -> nn.Module | None:
    """The dense architecture of ``model`` built from its config on the meta device (None if impossible)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    saved = config.__dict__.pop("quantization_config", None)
    try:
        with torch.device("meta"):
            return type(model)(config)
    except Exception as exc:  # an exotic model that cannot be rebuilt from its config
        logger.debug("dense skeleton of %s unavailable: %s", type(model).__name__, exc)
        return None
    finally:
        if saved is not None:
            config.quantization_config = saved


def _densify(layer: nn.Module, original: nn.Module | None, dtype: torch.dtype | None = None) -> nn.Module:
    """nn.Linear equivalent of a compressed layer, or a GPT-2 Conv1D when the architecture has one there."""
    dense = layer.to_dense()
    if original is not None and is_conv1d(original):
        conv = type(original)(layer.out_features, layer.in_features).to(
            dense.weight.device, dense.weight.dtype
        )
        with torch.no_grad():
            conv.weight.copy_(dense.weight.T)
            if dense.bias is not None:
                conv.bias.copy_(dense.bias)
            else:
                conv.bias.zero_()
        dense = conv
    return dense if dtype is None else dense.to(dtype)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """In place: every PIFALinear / LowRankLinear becomes the equivalent dense module of the architecture
    (nn.Linear, or Conv1D for GPT-2); the quantization config and quantizer are dropped, so the model
    saves and reloads as a plain dense model."""
    _densify_modules(model, dtype)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if "is_quantized" in model.__dict__:
        model.is_quantized = False
    if config is not None and getattr(config, "_is_quantized", False):
        config._is_quantized = False
    return model


def _densify_modules(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Replace every PIFALinear / LowRankLinear by the dense module it stands for, in place."""
    skeleton = _dense_skeleton(model)
    for name, module in compressed_modules(model).items():
        original = skeleton.get_submodule(name) if skeleton is not None else None
        parent_name, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent_name) if parent_name else model,
            child,
            _densify(module, original, dtype),
        )


class MPIFAHfQuantizer(HfQuantizer):
    """Loads MPIFA checkpoints: swaps the listed modules on meta, then transformers loads the tensors."""

    requires_calibration = True  # a dense checkpoint cannot be "quantized" on load: run mpifa-compress
    requires_parameters_quantization = False

    def __init__(self, quantization_config: MPIFAQuantizationConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        files = kwargs.get("checkpoint_files") or []
        pickled = [f for f in files if not str(f).endswith(".safetensors")]
        if pickled:
            raise ValueError(
                f"MPIFA checkpoints are read from safetensors only, found {pickled}: re-save with save_compressed()"
            )
        # The config then lists the names of this model (e.g. without "model." under AutoModel), so a
        # later save_compressed of the loaded model agrees with its modules.
        self.quantization_config.modules = resolve_module_names(model, self.quantization_config.modules)
        replace_with_pifa_layers(model, self.quantization_config.modules)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        return model

    def _dequantize(self, model, dtype: torch.dtype | None = None):
        # transformers then drops the quantization config (remove_quantization_config)
        _densify_modules(model, dtype)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Register the ``mpifa`` config and quantizer with transformers (idempotent; done at import)."""
    for mapping, cls in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, MPIFAQuantizationConfig),
        (AUTO_QUANTIZER_MAPPING, MPIFAHfQuantizer),
    ):
        current = mapping.get(QUANT_METHOD)
        if current is not None and current.__name__ != cls.__name__:
            raise RuntimeError(f"quant_method {QUANT_METHOD!r} is already registered by {current.__module__}")
        # Direct assignment (not register_*) so a module reload replaces the classes instead of raising.
        mapping[QUANT_METHOD] = cls


register()


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
    index = module._index.detach().cpu()
    return bool(torch.equal(index, torch.arange(index.numel(), dtype=index.dtype)))


def _check_guard(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """A process without the registered quantizer must either load each compressed module correctly or
    fail: its ``weight`` must differ in shape from the dense parameter of that name (size mismatch
    error), or be exactly the dense weight (full-rank PIFA in identity order)."""
    skeleton = _dense_skeleton(model)
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
    """Write a compressed model as a Hugging Face folder (safetensors + config.json with the
    ``mpifa`` quantization_config, tokenizer, optional README.md model card), atomically.

    The config's ``modules`` are taken from the model (every PIFALinear / LowRankLinear); a given
    config that lists other modules or other layouts is an error. The folder is written beside
    ``output_dir`` and renamed into place; an existing non-empty ``output_dir`` is refused unless
    ``overwrite=True`` (``--overwrite`` on the command line). Returns the folder.
    """
    output_dir = Path(output_dir).absolute()
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{output_dir} exists and is not empty: pass overwrite=True (--overwrite) to replace it, "
            "or choose another output folder"
        )
    modules = compressed_modules(model)
    if not modules:
        raise ValueError(
            "the model has no PIFALinear / LowRankLinear module: compress it first (mpifa_compress)"
        )
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
    _check_guard(model, modules)

    model.config.quantization_config = quantization_config
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if model_card is not None:
            (staging / "README.md").write_text(model_card, encoding="utf-8")
        pickles = [p.name for p in staging.rglob("*") if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise RuntimeError(
                f"refusing to publish pickled files {pickles}; MPIFA folders hold safetensors only"
            )
        _atomic_replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _atomic_replace(staging: Path, output_dir: Path) -> None:
    """Rename ``staging`` to ``output_dir``; an old folder is moved aside first and deleted after."""
    old = None
    if output_dir.exists():
        old = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(output_dir, old)
    os.replace(staging, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def enable_peft_lora(lora_config):
    """Let a peft ``LoraConfig`` target PIFALinear / LowRankLinear modules (returns the config).

    peft wraps only the module types it knows; this maps ours to peft's LoRA Linear layer, which adds
    the adapter output to the compressed layer's output. Merging the adapter into the factors is not
    supported (the sum is no longer low-rank): keep adapters unmerged, or dequantize first.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    lora_config._register_custom_module({PIFALinear: LoraLinear, LowRankLinear: LoraLinear})
    return lora_config
