"""peft bridge: let LoRA adapters wrap the compressed layers."""

from __future__ import annotations

from leanformers.storage.layers import LowRankLinear, PIFALinear

__all__ = ["enable_peft_lora"]


def enable_peft_lora(lora_config):
    """Let a peft ``LoraConfig`` target PIFALinear / LowRankLinear modules (returns the config).

    peft wraps only the module types it knows; this maps ours to peft's LoRA Linear layer, which adds
    the adapter output to the compressed layer's output. Merging the adapter into the factors is not
    supported (the sum is no longer low-rank): keep adapters unmerged, or dequantize first.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    lora_config._register_custom_module({PIFALinear: LoraLinear, LowRankLinear: LoraLinear})
    return lora_config
