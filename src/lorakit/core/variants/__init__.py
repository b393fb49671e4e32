"""The variant seam: `variant_for(config)` picks how an adapter computes and merges."""

from lorakit.core.variants.alora import ActivatedLoraVariant
from lorakit.core.variants.dora import DoraVariant
from lorakit.core.variants.lora import LoraVariant


def variant_for(config) -> LoraVariant:
    if config.is_alora:
        return ActivatedLoraVariant(config.alora_invocation_tokens)
    return DoraVariant() if config.use_dora else LoraVariant()


__all__ = ["LoraVariant", "DoraVariant", "ActivatedLoraVariant", "variant_for"]
