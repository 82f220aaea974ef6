"""Register ``sst`` as a PEFT method (peft 0.21).

peft's ``register_peft_method`` only accepts names that are already members of the closed
``PeftType`` enum: ``SSTConfig`` adds ``PeftType.SST`` (``leanformers._compat.extend_peft_type``),
then config and tuner classes are registered through the public function. Idempotent.
"""

from __future__ import annotations

from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import peft_types, register_peft_method

from leanformers._compat import extend_peft_type
from leanformers.sst.config import SAVED_PEFT_TYPE, SST_PEFT_TYPE, SSTConfig
from leanformers.sst.model import SSTModel

__all__ = ["SST_PEFT_TYPE", "ensure_peft_type", "register_sst"]


def ensure_peft_type():
    """``PeftType.SST`` (created on first call)."""
    return extend_peft_type(SST_PEFT_TYPE)


def _patch_parameter_count() -> None:
    """Let ``PeftModel.get_nb_trainable_parameters`` (and so ``print_trainable_parameters``) ask an SST tuner.

    PEFT counts ``named_parameters()``; for SST that misses the dense weights SST replaced (freed, so "all"
    shrinks) and so over-states the trainable share. Only models whose tuner defines
    ``get_nb_trainable_parameters`` (SST) are affected; every other PEFT model keeps PEFT's count.
    """
    original = PeftModel.get_nb_trainable_parameters
    if getattr(original, "_leanformers_sst", False):
        return

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        tuner_count = getattr(type(self.base_model), "get_nb_trainable_parameters", None)
        if tuner_count is not None and getattr(type(self.base_model), "prefix", None) == "sst_":
            return self.base_model.get_nb_trainable_parameters()
        return original(self)

    get_nb_trainable_parameters.__doc__ = original.__doc__
    get_nb_trainable_parameters._leanformers_sst = True
    PeftModel.get_nb_trainable_parameters = get_nb_trainable_parameters


def register_sst() -> None:
    """Make ``get_peft_model(model, SSTConfig(...))`` and ``PeftModel.from_pretrained`` know SST."""
    peft_type = ensure_peft_type()
    assert peft_types.PeftType.SST is peft_type
    _patch_parameter_count()
    if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name="sst", config_cls=SSTConfig, model_cls=SSTModel, prefix="sst_")
    # adapter_config.json spells the type SAVED_PEFT_TYPE (its KeyError without leanformers names the fix);
    # peft 0.21 reads it back only through PEFT_TYPE_TO_CONFIG_MAPPING[<json value>], and SSTConfig turns
    # it into PeftType.SST
    PEFT_TYPE_TO_CONFIG_MAPPING.setdefault(SAVED_PEFT_TYPE, SSTConfig)
