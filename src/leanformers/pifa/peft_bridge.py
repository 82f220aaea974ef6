"""Deprecated: ``leanformers.pifa.peft_bridge`` moved (see ARCHITECTURE.md); this shim re-exports its names."""

from leanformers.pifa import warn_moved
from leanformers.storage.peft_bridge import enable_peft_lora  # noqa: E402

warn_moved("leanformers.pifa.peft_bridge", "leanformers.storage.peft_bridge")

__all__ = ["enable_peft_lora"]
