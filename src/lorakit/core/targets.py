"""Which modules of a model an adapter touches.

Matching follows PEFT: a list entry matches a module whose full name equals it or ends with `.entry`; a
string is a regex that must match the full name (RE2, see core/patterns.py). Unlike PEFT, a name that
matches nothing, or a match that LoRA cannot wrap, is an error rather than a silent no-op.
"""

from __future__ import annotations

import difflib
from typing import Iterator, Optional

from torch import nn

from lorakit.core.config import ALL_LINEAR, LoraConfig
from lorakit.core.layers import LoraLayer, SUPPORTED_LAYERS, unsupported_reason
from lorakit.core.layers.linear import is_transformers_conv1d
from lorakit.core.patterns import fullmatches
from lorakit.core.trainable_copy import TrainableCopy
from lorakit.errors import TargetError

# Where target_modules is left unset: the attention projections the LoRA paper adapts (W_q, W_v). Each
# model type lists the names different transformers versions give them; the first that exists is used.
_QV = [["q_proj", "v_proj"], ["query", "value"]]
DEFAULT_TARGETS = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "opt", "gptj", "bart",
                     "bert", "roberta", "vit"], _QV),
    "phi3": [["qkv_proj"]], "gpt2": [["c_attn"]], "gpt_neox": [["query_key_value"]], "falcon": [["query_key_value"]],
    "bloom": [["query_key_value"]], "t5": [["q", "v"]], "mt5": [["q", "v"]],
}
_HEAD_NAMES = ("lm_head", "classifier", "score")


def name_matches(spec, name: str) -> bool:
    """Does module `name` match a target spec (regex string or list of names/suffixes)?"""
    if spec is None:
        return False
    if isinstance(spec, str):
        return fullmatches(spec, name)
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def adaptable_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules(), minus the insides of lorakit wrappers (a wrapper stands for its base layer)."""
    inside: Optional[str] = None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        inside = name + "." if isinstance(module, (LoraLayer, TrainableCopy)) else None
        yield name, module


def _is_linear(module: nn.Module) -> bool:
    base = module.base_layer if isinstance(module, LoraLayer) else module
    return (isinstance(base, nn.Linear) or is_transformers_conv1d(base)
            or getattr(base, "is_quantized_linear", False))  # lorakit.quant's frozen 4/8-bit linear layers


def output_head_names(model: nn.Module) -> set[str]:
    """The output layer(s) 'all-linear' leaves alone: the LM head, or a classifier head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        is_wrapped_head = isinstance(module, LoraLayer) and module.base_layer is head
        if head is not None and (module is head or is_wrapped_head):
            names.add(name)
    if not names:
        names = {name for name, _ in model.named_children() if name in _HEAD_NAMES}
    return names


def resolve_target_modules(model: nn.Module, config: LoraConfig):
    """target_modules as a concrete spec: defaults for None, and 'all-linear' as a list of names.

    'all-linear' becomes the leaf names (q_proj, ...) when those select exactly the same modules, the
    form vLLM and PEFT both read; otherwise the full module names.
    """
    spec = config.target_modules
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise TargetError(
                f"target_modules is not set and there is no default for model type {model_type!r}; set it, "
                "e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear'")
        names = [name for name, _ in adaptable_modules(model)]
        for candidate in DEFAULT_TARGETS[model_type]:
            if all(any(name_matches([entry], name) for name in names) for entry in candidate):
                return candidate
        return DEFAULT_TARGETS[model_type][0]
    if spec != ALL_LINEAR:
        return spec
    heads = output_head_names(model)
    linear = {name for name, module in adaptable_modules(model)
              if name and _is_linear(module) and not any(name == h or name.startswith(h + ".") for h in heads)}
    if not linear:
        raise TargetError(f"target_modules='all-linear' found no linear layer in {type(model).__name__}")
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
    selected = {name for name, module in adaptable_modules(model) if name and name_matches(leaves, name)}
    return leaves if selected == linear else sorted(linear)


def _suggest(entry: str, names: list[str]) -> str:
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names if name})
    close = difflib.get_close_matches(entry.rsplit(".", 1)[-1], leaves, n=3)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


def find_targets(model: nn.Module, config: LoraConfig, spec, every_entry_must_match: bool
                 ) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module `spec` selects, after exclude_modules and modules_to_save.

    Raises TargetError when nothing matches, when a list entry matches nothing (if
    `every_entry_must_match`; a typo would otherwise silently train fewer layers), or when a match is a
    module LoRA cannot wrap.
    """
    modules = list(adaptable_modules(model))
    names = [name for name, _ in modules]
    saved = config.modules_to_save or []
    targets = []
    for name, module in modules:
        if not name or not name_matches(spec, name) or name_matches(config.exclude_modules, name):
            continue
        if any(name == m or name.startswith(m + ".") or name.endswith("." + m) or f".{m}." in name for m in saved):
            continue
        reason = unsupported_reason(module)
        if reason is not None:
            children = sorted({child for child, _ in module.named_children()})
            hint = f" Its children are: {', '.join(children)}." if children else ""
            raise TargetError(f"target_modules selects {name!r}, but {reason}.{hint}")
        targets.append((name, module))
    model_name = type(model).__name__
    if not targets:
        example = ", ".join(sorted({n.rsplit('.', 1)[-1] for n, m in modules if n and _is_linear(m)})[:12])
        hints = "".join(_suggest(entry, names) for entry in spec) if isinstance(spec, list) else ""
        raise TargetError(
            f"target_modules={spec!r} matched no module of {model_name} (after exclude_modules).{hints} Linear "
            f"layers it has: {example or 'none'}; LoRA can wrap {SUPPORTED_LAYERS}.")
    if every_entry_must_match and isinstance(spec, list):
        for entry in spec:  # a typo check, so against every module, before exclusions
            if not any(name_matches([entry], name) for name in names):
                raise TargetError(f"target_modules entry {entry!r} matches no module of {model_name}."
                                  f"{_suggest(entry, names)}")
    if isinstance(config.exclude_modules, list):
        for entry in config.exclude_modules:
            if not any(name_matches([entry], name) for name in names):
                raise TargetError(f"exclude_modules entry {entry!r} matches no module of {model_name}."
                                  f"{_suggest(entry, names)}")
    return targets


def find_saved_modules(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) for each `modules_to_save` entry: trained in full, one copy per adapter."""
    found = []
    modules = list(adaptable_modules(model))
    for entry in config.modules_to_save or []:
        matches = [(name, module) for name, module in modules if name and name_matches([entry], name)]
        if not matches:
            raise TargetError(f"modules_to_save entry {entry!r} matches no module of {type(model).__name__}."
                              f"{_suggest(entry, [n for n, _ in modules])}")
        for name, module in matches:
            if isinstance(module, LoraLayer):
                raise TargetError(f"modules_to_save entry {entry!r} selects {name!r}, which already has a LoRA "
                                  "adapter; a module is either adapted or trained in full, not both")
            found.append((name, module))
    return found
