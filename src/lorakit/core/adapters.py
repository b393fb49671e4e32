"""Attach named adapters to any `torch.nn.Module`, in place, and choose which one runs.

    add_adapter(model, config, name)   wrap the targets, freeze the base, activate the new adapter
    set_adapter(model, name)           the adapter the forward pass uses (only it is trainable)
    disable_adapters(model)            context manager: run the bare base model
    delete_adapter(model, name)

Every check (names, targets, layer types, init support) runs before the model is touched, so a
rejected call leaves the model exactly as it was.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

from torch import nn

from lorakit.core.config import LoraConfig
from lorakit.core.layers import LoraLayer, LoraLinear, wrap_for
from lorakit.core.pissa import pissa_init
from lorakit.core.targets import find_saved_modules, find_targets, resolve_target_modules
from lorakit.core.trainable_copy import TrainableCopy
from lorakit.core.variants import variant_for
from lorakit.core.variants.alora import ActivatedLoraVariant, track_invocations
from lorakit.errors import AdapterError, ConfigError

STATE_ATTRIBUTE = "lorakit_adapters"
_VALID_NAME = re.compile(r"[A-Za-z0-9_\-]+")


@dataclass
class AdapterSet:
    """What lorakit attached to one model; lives at `model.lorakit_adapters`."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    trainable: set[str] = field(default_factory=set)
    active: Optional[str] = None
    disabled_depth: int = 0
    # Base parameters that were trainable before lorakit froze them; unfrozen again by merge_and_unload.
    frozen_by_lorakit: list[nn.Parameter] = field(default_factory=list)
    # aLoRA: each activated adapter's variant (shared by its layers), and the model's hook that feeds it offsets
    activated: dict[str, ActivatedLoraVariant] = field(default_factory=dict)
    hooked: bool = False   # the hook stays for the model's life; with no adapter state it does nothing


def adapter_set(model: nn.Module) -> AdapterSet:
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is None:
        raise AdapterError(f"{type(model).__name__} has no lorakit adapter; call add_adapter or load_adapter first")
    return state


def require_adapter(model: nn.Module, name: str) -> AdapterSet:
    state = adapter_set(model)
    if name not in state.configs:
        known = ", ".join(map(repr, state.configs)) or "none"
        raise AdapterError(f"no adapter named {name!r} on this model (adapters: {known})")
    return state


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def wrappers(model: nn.Module) -> Iterator[nn.Module]:
    """Every LoraLayer and TrainableCopy: the modules that follow the active/disabled state."""
    for module in model.modules():
        if isinstance(module, (LoraLayer, TrainableCopy)):
            yield module


@dataclass
class AdapterPlan:
    """Where adapter `name` goes, worked out before anything is changed."""

    name: str
    config: LoraConfig
    layers: dict[str, LoraLayer]  # module name -> wrapper (new or existing)
    saved_modules: dict[str, nn.Module]  # module name -> module to copy


def plan_adapter(model: nn.Module, config: LoraConfig, name: str, from_file: bool = False) -> AdapterPlan:
    """Resolve targets and check them; `from_file` relaxes the every-entry check (the file decides)."""
    if not isinstance(name, str) or not _VALID_NAME.fullmatch(name):
        raise AdapterError(f"adapter name {name!r} must be letters, digits, '_' or '-' (no dots or spaces)")
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is not None and name in state.configs:
        raise AdapterError(f"an adapter named {name!r} is already attached; delete_adapter it or pick another name")
    spec = resolve_target_modules(model, config)
    config = config.replace(target_modules=spec)
    targets = find_targets(model, config, spec, every_entry_must_match=not from_file)
    layers = {}
    for module_name, module in targets:
        layer = wrap_for(module)
        if not from_file and not layer.supports_init(config.init_lora_weights):
            raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} needs a linear layer, but target "
                              f"{module_name!r} is {type(layer.base_layer).__name__}")
        if not from_file and config.is_pissa and config.rank_for(module_name) > min(layer.to_rows(layer.weight).shape):
            raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} with r={config.rank_for(module_name)} "
                              f"exceeds the rank of {module_name!r} (weight {tuple(layer.weight.shape)}); PiSSA takes "
                              "r singular vectors, so r must be at most the smaller side")
        if config.is_alora and not isinstance(layer, LoraLinear):
            raise ConfigError(f"alora_invocation_tokens: target {module_name!r} is {type(layer.base_layer).__name__}; "
                              "an activated LoRA adapts linear layers only (as in PEFT)")
        layers[module_name] = layer
    if any(layer.fan_in_fan_out for layer in layers.values() if hasattr(layer, "fan_in_fan_out")):
        config = config.replace(fan_in_fan_out=True)
    saved = dict(find_saved_modules(model, config))
    return AdapterPlan(name, config, layers, saved)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def install(model: nn.Module, plan: AdapterPlan, initialize: bool) -> None:
    """Put the planned wrappers in place and create the adapter's parameters.

    With `initialize`, A and B get the config's init (PiSSA also rewrites the base weight) and DoRA's
    magnitude is computed; without it they are left for the caller to fill (loading from a file).
    """
    config, name = plan.config, plan.name
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is None:
        state = AdapterSet()
        setattr(model, STATE_ATTRIBUTE, state)
    variant = variant_for(config)   # one per adapter: an activated LoRA's offsets are shared by its layers
    if isinstance(variant, ActivatedLoraVariant):
        state.activated[name] = variant
        if not state.hooked:
            track_invocations(model, state)
            state.hooked = True
    for module_name, layer in plan.layers.items():
        if layer is not model.get_submodule(module_name):
            layer.train(layer.base_layer.training)  # a new wrapper follows the model's train/eval mode
            set_submodule(model, module_name, layer)
        layer.add(name, config.rank_for(module_name), config.scaling_for(module_name), config.lora_dropout, variant)
        if initialize:
            if config.is_pissa:
                pissa_init(layer, name, config.pissa_niter)
            else:
                layer.reset_factors(name, config.init_lora_weights)
            variant.init(layer, name)
    for module_name, module in plan.saved_modules.items():
        wrapper = module if isinstance(module, TrainableCopy) else TrainableCopy(module)
        if wrapper is not module:
            wrapper.training = wrapper.modules_to_save.training = module.training
            set_submodule(model, module_name, wrapper)
        wrapper.add(name)
    state.configs[name] = config
    _freeze_base(model, state)


def _adapter_parameter_ids(model: nn.Module) -> set[int]:
    ids = set()
    for module in wrappers(model):
        if isinstance(module, LoraLayer):
            for params in (module.lora_A, module.lora_B, module.lora_magnitude_vector):
                ids.update(id(p) for p in params.values())
        else:
            ids.update(id(p) for p in module.modules_to_save.parameters())
    return ids


def _freeze_base(model: nn.Module, state: AdapterSet) -> None:
    adapter_ids = _adapter_parameter_ids(model)
    for param in model.parameters():
        if id(param) not in adapter_ids and param.requires_grad:
            param.requires_grad_(False)
            state.frozen_by_lorakit.append(param)


def _adapter_parameters(model: nn.Module, name: str) -> Iterator[nn.Parameter]:
    for module in wrappers(model):
        if isinstance(module, LoraLayer):
            for params in (module.lora_A, module.lora_B, module.lora_magnitude_vector):
                if name in params:
                    yield params[name]
        elif name in module.modules_to_save:
            yield from module.modules_to_save[name].parameters()


def add_adapter(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Wrap `config`'s target modules with a new adapter `name`, freeze the base and activate it.

    Returns the same model (changed in place). Only the new adapter's parameters are trainable.
    """
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"add_adapter needs a LoraConfig, got {type(config).__name__}")
    plan = plan_adapter(model, config, name)
    install(model, plan, initialize=True)
    adapter_set(model).trainable.add(name)
    set_adapter(model, name)
    return model


def set_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the adapter that runs; it alone is trainable (if it was added or loaded as such)."""
    state = require_adapter(model, name)
    state.active = name
    for module in wrappers(model):
        module.set_active(name)
    for other in state.configs:
        for param in _adapter_parameters(model, other):
            param.requires_grad_(other == name and other in state.trainable)


def active_adapter(model: nn.Module) -> Optional[str]:
    return adapter_set(model).active


def list_adapters(model: nn.Module) -> dict[str, LoraConfig]:
    """Name -> config of every adapter attached to `model` (empty for a plain model)."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    return dict(state.configs) if state is not None else {}


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` (it must not be merged). Wrappers left with no adapter stay in place."""
    state = require_adapter(model, name)
    merged = [layer_name for layer_name, layer in adapter_layers(model) if name in layer.merged_adapters]
    if merged:
        raise AdapterError(f"adapter {name!r} is merged into {len(merged)} layers; unmerge_adapter(model) first")
    for module in wrappers(model):
        module.remove(name)
    del state.configs[name]
    state.activated.pop(name, None)
    state.trainable.discard(name)
    if state.active == name:
        state.active = None


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the bare base model inside the block.

    Merged adapters are unmerged for the block and merged back after it, so the output is the base
    model's whether or not anything was merged.
    """
    from lorakit.core.merge import merged_adapter_names, merge_adapter, unmerge_adapter

    state = adapter_set(model)
    merged = merged_adapter_names(model) if state.disabled_depth == 0 else []
    if merged:
        unmerge_adapter(model)
    state.disabled_depth += 1
    for module in wrappers(model):
        module.set_disabled(True)
    try:
        yield model
    finally:
        state.disabled_depth -= 1
        if state.disabled_depth == 0:
            for module in wrappers(model):
                module.set_disabled(False)
            for name in merged:
                merge_adapter(model, name)

