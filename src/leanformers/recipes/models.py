"""The ``model`` section: a model from a transformers config (random init) or from pretrained weights.

::

    model: {config: {model_type: llama, hidden_size: 64, ...}, seed: 0, dtype: float32}
    model: {pretrained: path-or-hub-id, dtype: bfloat16}
"""

from __future__ import annotations

import inspect

import torch

from leanformers.recipes.checks import RecipeError, check_value, suggest, unknown_key

__all__ = ["DTYPES", "MODEL_KEYS", "build_model", "check_model_section"]

DTYPES = ("float32", "bfloat16", "float16", "float64")
# config entries every transformers config takes (some only through **kwargs)
_COMMON_CONFIG_KEYS = {
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "num_labels",
    "use_cache",
    "tie_word_embeddings",
}
MODEL_KEYS = {"config": dict, "pretrained": str, "dtype": str, "seed": int}


def build_model(
    spec: dict,
    vocab_size: int | None = None,
    auto_class: str = "AutoModelForCausalLM",
    defaults: dict | None = None,
) -> torch.nn.Module:
    """A model from ``{config: {...}}`` (random init, ``seed`` optional) or ``{pretrained: ...}``.

    ``auto_class`` is the transformers Auto class of the task (causal LM, seq2seq LM, sequence
    classification); ``defaults`` fill config entries the recipe leaves out (e.g. the tokenizer's pad id).
    """
    import transformers
    from transformers import AutoConfig

    auto = getattr(transformers, auto_class)
    dtype = getattr(torch, spec.get("dtype", "float32"))
    if "pretrained" in spec:
        return auto.from_pretrained(spec["pretrained"], dtype=dtype)
    if "config" not in spec:
        raise RecipeError("model: give either 'config: {model_type: ..., ...}' or 'pretrained: path-or-id'")
    cfg = dict(spec["config"])
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise RecipeError("model.config needs a model_type (e.g. model.config.model_type=llama)")
    if vocab_size is not None:
        cfg.setdefault("vocab_size", vocab_size)
    for key, value in (defaults or {}).items():
        if value is not None:
            cfg.setdefault(key, value)
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(int(spec.get("seed", 0)))
    return auto.from_config(config, dtype=dtype)


def _config_keys(model_type: str) -> set[str]:
    """What a transformers config of ``model_type`` accepts: its __init__ arguments and attributes."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    cls = CONFIG_MAPPING[model_type]
    keys = set(inspect.signature(cls.__init__).parameters) | set(
        inspect.signature(PretrainedConfig.__init__).parameters
    )
    keys |= set(vars(cls())) | set(getattr(cls, "attribute_map", {})) | _COMMON_CONFIG_KEYS
    keys |= {name for name in dir(cls) if not name.startswith("_") and not callable(getattr(cls, name, None))}
    return {k for k in keys if not k.startswith("_")} - {"self", "kwargs"}


def check_model_section(spec) -> None:
    """Raise a :class:`RecipeError` for a bad ``model`` section (unknown keys, model_type or config keys)."""
    from transformers import CONFIG_MAPPING

    if not isinstance(spec, dict):
        raise RecipeError(f"model={spec!r}: expected a mapping, e.g. model: {{pretrained: path-or-hub-id}}")
    for key, value in spec.items():
        if key not in MODEL_KEYS:
            raise unknown_key("model", key, MODEL_KEYS)
        check_value(f"model.{key}", value, MODEL_KEYS[key])
    if ("config" in spec) == ("pretrained" in spec):
        raise RecipeError("model: give either 'config: {model_type: ..., ...}' or 'pretrained: path-or-id'")
    if spec.get("dtype", "float32") not in DTYPES:
        guess = suggest(str(spec["dtype"]), DTYPES)
        raise RecipeError(
            f"model.dtype={spec['dtype']!r}: expected one of {', '.join(DTYPES)}"
            + (f"; did you mean {guess}?" if guess else "")
        )
    if "config" not in spec:
        return
    model_type = spec["config"].get("model_type")
    if model_type is None:
        raise RecipeError("model.config needs a model_type (e.g. model.config.model_type=llama)")
    if model_type not in CONFIG_MAPPING:
        raise unknown_key(
            "model.config.model_type",
            str(model_type),
            list(CONFIG_MAPPING.keys()),
            "transformers model types",
        )
    valid = _config_keys(model_type)
    for key in spec["config"]:
        if key != "model_type" and key not in valid:
            raise unknown_key(
                "model.config", key, valid, f"the {type(CONFIG_MAPPING[model_type]()).__name__} fields"
            )
