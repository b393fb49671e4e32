"""Fold adapters into the base weights, and back out again.

    merge_adapter(model, name)   W ← W + s·BA (DoRA: m ⊙ (W + s·BA)/‖W + s·BA‖), in fp32, cast to W's dtype
    unmerge_adapter(model)       undo every merge, newest first (fp32 relative error ~1e-7)
    merge_and_unload(model)      merge the active adapter and return plain torch modules

A merged model costs exactly what the base model costs; an unmerged one keeps adapters switchable.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from lorakit.core.adapters import STATE_ATTRIBUTE, adapter_layers, adapter_set, require_adapter, set_submodule
from lorakit.core.layers import LoraLayer
from lorakit.core.trainable_copy import TrainableCopy
from lorakit.errors import AdapterError


def merged_adapter_names(model: nn.Module) -> list[str]:
    """Adapters merged into at least one layer, in merge order."""
    names: list[str] = []
    for _, layer in adapter_layers(model):
        names.extend(name for name in layer.merged_adapters if name not in names)
    return names


def merge_adapter(model: nn.Module, name: Optional[str] = None) -> None:
    """Merge adapter `name` (default: the active one) into every layer it adapts."""
    state = adapter_set(model)
    name = name if name is not None else state.active
    if name is None:
        raise AdapterError("no adapter is active; pass the name of the adapter to merge")
    require_adapter(model, name)
    if state.disabled_depth:
        raise AdapterError("cannot merge inside disable_adapters(); merge after the block")
    layers = [layer for _, layer in adapter_layers(model)
              if name in layer.adapter_names and name not in layer.merged_adapters]
    merged = [layer.merged_weight(name) for layer in layers]  # all checked before any weight changes
    for layer, weight in zip(layers, merged):
        layer.write_merged(name, weight)


def unmerge_adapter(model: nn.Module) -> None:
    """Restore the base weights of every layer that has adapters merged into it."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter (unless merged already) and remove every trace of lorakit.

    LoRA wrappers are replaced by their base layers, `modules_to_save` wrappers by the active adapter's
    trained copy, and base parameters lorakit froze become trainable again. Returns the same model.
    """
    state = adapter_set(model)
    if state.disabled_depth:
        raise AdapterError("cannot merge_and_unload inside disable_adapters()")
    if state.active is not None and state.active not in merged_adapter_names(model):
        merge_adapter(model, state.active)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            set_submodule(model, name, module.base_layer)
        elif isinstance(module, TrainableCopy):
            set_submodule(model, name, module.running_module())
    for param in state.frozen_by_lorakit:
        param.requires_grad_(True)
    delattr(model, STATE_ATTRIBUTE)
    return model
