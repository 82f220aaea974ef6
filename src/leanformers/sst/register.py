"""Register ``sst`` as a PEFT method (peft 0.21).

peft's ``register_peft_method`` only accepts names that are already members of the closed
``PeftType`` enum. We add an ``SST`` member to that enum at import time (the same object identity
everywhere, so ``PeftType("SST")``, ``PeftType.SST`` and the string ``"SST"`` all resolve), then
register config and tuner classes through the public function. Idempotent.
"""

from __future__ import annotations

from peft.utils import peft_types
from peft.utils.peft_types import PeftType

__all__ = ["SST_PEFT_TYPE", "ensure_peft_type", "register_sst"]

SST_PEFT_TYPE = "SST"


def _add_enum_member(enum_cls, name: str, value: str):
    """Add a member to a ``str``-mixin Enum after its creation (what ``aenum.extend_enum`` does)."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    if hasattr(enum_cls, "_sort_order_"):  # pragma: no cover - only some Python versions keep this
        member._sort_order_ = len(enum_cls._member_names_)
    # Set the class attribute before the member map so Enum's "cannot reassign member" guard stays quiet.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def ensure_peft_type():
    """``PeftType.SST`` (created on first call)."""
    return _add_enum_member(PeftType, SST_PEFT_TYPE, SST_PEFT_TYPE)


def _patch_parameter_count() -> None:
    """Let ``PeftModel.get_nb_trainable_parameters`` (and so ``print_trainable_parameters``) ask an SST tuner.

    PEFT counts ``named_parameters()``; for SST that misses the dense weights SST replaced (freed, so "all"
    shrinks) and so over-states the trainable share. Only models whose tuner defines
    ``get_nb_trainable_parameters`` (SST) are affected; every other PEFT model keeps PEFT's count.
    """
    from peft import PeftModel

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
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = ensure_peft_type()
    assert peft_types.PeftType.SST is peft_type
    _patch_parameter_count()
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    from peft.utils import register_peft_method

    from leanformers.sst.config import SSTConfig
    from leanformers.sst.model import SSTModel

    register_peft_method(name="sst", config_cls=SSTConfig, model_cls=SSTModel, prefix="sst_")
