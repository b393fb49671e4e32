"""The variant seam: `variant_for(config)` picks how an adapter computes and merges."""

from lorakit.core.variants.dora import DoraVariant
from lorakit.core.variants.lora import LoraVariant


def variant_for(config) -> LoraVariant:
    return DoraVariant() if config.use_dora else LoraVariant()


__all__ = ["LoraVariant", "DoraVariant", "variant_for"]
