"""Adapter layers: one wrapper class per kind of base layer, chosen by `wrap_for`."""

from __future__ import annotations

from typing import Optional

from torch import nn

from lorakit.core.layers.base import LoraLayer
from lorakit.core.layers.conv import LoraConv
from lorakit.core.layers.embedding import LoraEmbedding
from lorakit.core.layers.linear import LoraLinear, is_transformers_conv1d

SUPPORTED_LAYERS = ("nn.Linear (also quantized by lorakit.quant), nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d and "
                    "transformers' Conv1D")


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """None when LoRA can wrap `module`, else why not (for the error message)."""
    if isinstance(module, (nn.Linear, nn.Embedding, LoraLayer)) or is_transformers_conv1d(module):
        return None
    if getattr(module, "is_quantized_linear", False):  # lorakit.quant.QuantizedLinear
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1:
            return f"grouped convolutions (groups={module.groups}) are not supported"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
        return None
    return f"{type(module).__name__} is not a layer LoRA can wrap; supported: {SUPPORTED_LAYERS}"


def wrap_for(module: nn.Module) -> LoraLayer:
    """The LoraLayer wrapping `module` (which must pass `unsupported_reason`)."""
    if isinstance(module, LoraLayer):
        return module
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoraConv(module)
    return LoraLinear(module)


__all__ = ["LoraLayer", "LoraLinear", "LoraEmbedding", "LoraConv", "wrap_for", "unsupported_reason",
           "SUPPORTED_LAYERS"]
