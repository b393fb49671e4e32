"""Adapter folders in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module path>.<suffix>`:

    Linear / Conv1D / ConvNd   .lora_A.weight (r, d_in[, k...])   .lora_B.weight (d_out, r[, 1...])
    Embedding                  .lora_embedding_A (r, vocab)       .lora_embedding_B (dim, r)
    DoRA                       .lora_magnitude_vector (d_out,)    (ConvNd: (1, c_out, 1...))
    modules_to_save            the module's own keys, e.g. base_model.model.classifier.weight

Loading is strict where PEFT is lenient: every targeted module must have its weights in the file, every
tensor in the file must land somewhere, shapes must agree, and nothing is changed on the model until all
of that has been checked.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from lorakit.core.adapters import (AdapterPlan, STATE_ATTRIBUTE, adapter_layers, install, plan_adapter,
                                   require_adapter, set_adapter)
from lorakit.core.layers import LoraEmbedding, LoraLayer
from lorakit.core.pissa import converted_alpha, pissa_to_standard
from lorakit.core.trainable_copy import TrainableCopy
from lorakit.errors import AdapterError, AdapterFileError, LorakitError
from lorakit.io.adapter import BASE_WEIGHT_SUFFIX as _BASE_WEIGHT
from lorakit.io.adapter import PREFIX, WEIGHTS_NAME, Adapter, a_few, split_key
from lorakit.io.adapter_config import CONFIG_NAME
from lorakit.io.base_record import BaseRecord, record_base
from lorakit.models.hub import HubUnreachableError, from_hub
from lorakit.models.loading import HUB_ID

_TASK_TYPES = [("ForCausalLM", "CAUSAL_LM"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
               ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
               ("ForQuestionAnswering", "QUESTION_ANS")]


def _key(module_name: str, layer: LoraLayer, part: str) -> str:
    if part == "magnitude":
        return f"{PREFIX}{module_name}.lora_magnitude_vector"
    embedding = isinstance(layer, LoraEmbedding)
    return f"{PREFIX}{module_name}." + (f"lora_embedding_{part}" if embedding else f"lora_{part}.weight")


# --- saving ------------------------------------------------------------------------------------------
def adapter_state(model: nn.Module, name: str = "default") -> tuple[dict[str, torch.Tensor], "object"]:
    """(tensors keyed as PEFT saves them, config to write) for adapter `name`.

    A PiSSA adapter is converted to the standard rank-2r adapter for the original base (see core.pissa).
    """
    state = require_adapter(model, name)
    config = state.configs[name]
    # Only an adapter PiSSA-initialised here has (A0, B0); a loaded one is saved as it was read.
    layers = [layer for _, layer in adapter_layers(model) if name in layer.adapter_names]
    convert = config.is_pissa and all(name in layer.pissa_initial for layer in layers)
    tensors: dict[str, torch.Tensor] = {}
    for module_name, layer in adapter_layers(model):
        if name not in layer.adapter_names:
            continue
        if convert:
            a, b = pissa_to_standard(layer, name)
        else:
            a, b = layer.lora_A[name], layer.lora_B[name]
        tensors[_key(module_name, layer, "A")] = a
        tensors[_key(module_name, layer, "B")] = b
        if name in layer.lora_magnitude_vector:
            magnitude = layer.lora_magnitude_vector[name]
            tensors[_key(module_name, layer, "magnitude")] = layer.per_output(magnitude, layer.weight)
    for module_name, module in model.named_modules():
        if isinstance(module, TrainableCopy) and name in module.modules_to_save:
            for key, value in module.modules_to_save[name].state_dict().items():
                tensors[f"{PREFIX}{module_name}.{key}"] = value
    if convert:
        double = {k: 2 * v for k, v in config.rank_pattern.items()}
        alphas = {k: converted_alpha(v, config.use_rslora) for k, v in config.alpha_pattern.items()}
        config = config.replace(r=2 * config.r, lora_alpha=converted_alpha(config.lora_alpha, config.use_rslora),
                                rank_pattern=double, alpha_pattern=alphas, init_lora_weights=True)
    return tensors, config


def _check_whole(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], config, folder: Path) -> None:
    """Every adapted module's A and B have the shapes its layer and the config's rank give them, and no tensor is
    empty (a shard of a parameter split across processes, or a placeholder, is refused)."""
    for module_name, layer in adapter_layers(model):
        if name not in layer.adapter_names:
            continue
        for part, expected in zip("AB", layer.factor_shapes(config.rank_for(module_name))):
            key = _key(module_name, layer, part)
            if tuple(tensors[key].shape) != tuple(expected):
                raise AdapterError(f"refusing to save {folder}: {key} is {tuple(tensors[key].shape)}, its layer and "
                                   f"rank make it {tuple(expected)}; only part of the tensor is here")
    empty = [key for key, tensor in tensors.items() if tensor.numel() == 0]
    if empty:
        raise AdapterError(f"refusing to save {folder}: {a_few(empty)} hold no values")


def _model_metadata(model: nn.Module, config, base: BaseRecord):
    """PEFT's own fields: the base's name (the embedded model by its name, not a site-packages path), task."""
    changes = {"inference_mode": True}
    if config.base_model_name_or_path is None and base.name is not None:
        changes["base_model_name_or_path"] = base.name
    if config.task_type is None:
        cls = type(model).__name__
        changes["task_type"] = next((task for suffix, task in _TASK_TYPES if cls.endswith(suffix)), None)
    return config.replace(**changes)


def save_adapter(model: nn.Module, path: Union[str, Path], name: str = "default",
                 base: Optional[BaseRecord] = None) -> Path:
    """Write adapter `name` as a PEFT adapter folder at `path` (created if needed); returns the folder.

    The weights file's header also records the base model it was saved on (io.base_record: name, digest;
    `base` gives that record when the model in memory cannot: its base weights are sharded across processes).
    The files are checked as `Adapter.read` checks them, and every factor against its layer's shape, before
    anything is written, then written atomically: an empty or partial tensor never reaches the file.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise AdapterFileError(f"{folder} exists and is not a folder; an adapter is saved as a folder")
    tensors, config = adapter_state(model, name)
    _check_whole(model, name, tensors, config, folder)
    base = base or record_base(model, name)
    adapter = Adapter.from_tensors(_model_metadata(model, config, base), tensors, str(folder / WEIGHTS_NAME), base)
    return adapter.save(folder)


# --- loading -----------------------------------------------------------------------------------------
def resolve_adapter_folder(path: Union[str, Path], allow_hub: bool = True) -> Path:
    """A local adapter folder, or (with allow_hub) a hub repo id `owner/name` downloaded to the local cache.

    A path that exists is always local; one that does not is a hub id only when it is exactly `owner/name`
    and does not start like a path (`.`, `/`, `~`), so a mistyped relative path is not sent to the hub.
    The hub is asked through models/hub.py: out of reach, the local cache answers or the error comes at once.
    """
    text = str(path)
    if not text or "\0" in text or len(text) > 4096:
        raise AdapterFileError("an adapter path must be a non-empty folder path of at most 4096 characters")
    try:
        folder = Path(text).expanduser()
        exists = folder.exists()
    except (OSError, RuntimeError) as exc:  # a name too long, ~user that does not exist, ...
        raise AdapterFileError(f"{text[:200]}: not a usable folder path ({exc})") from None
    if exists:
        if not folder.is_dir():
            raise AdapterFileError(f"{folder} is a file; pass the adapter folder that holds {CONFIG_NAME}")
        if not (folder / CONFIG_NAME).is_file():
            raise _not_an_adapter(folder)
        return folder
    if allow_hub and HUB_ID.fullmatch(text) and ".." not in text:
        return _download(text)
    raise AdapterFileError(f"{text[:200]}: no such adapter folder")


def _not_an_adapter(folder: Path) -> AdapterFileError:
    """The one-line error for an existing folder without adapter_config.json: what is missing and what to
    pass instead; never the folder's listing (a runs folder may hold hundreds of entries)."""
    nested = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_NAME}"))
    if nested:
        return AdapterFileError(f"{folder} holds several adapters ({a_few(nested)}), not one; pass one adapter's "
                                f"folder, e.g. {folder / nested[0]}")
    return AdapterFileError(f"{folder} is not an adapter folder: it has no {CONFIG_NAME}; pass the folder that holds "
                            f"{CONFIG_NAME} and {WEIGHTS_NAME} (what lorakit train or PEFT's save_pretrained writes)")


def _download(repo_id: str) -> Path:
    """The hub repo's two adapter files, in the local hub cache."""
    from huggingface_hub import snapshot_download

    def fetch(local_only: bool) -> str:
        return snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME], local_files_only=local_only)

    try:
        return Path(from_hub(repo_id, fetch))
    except HubUnreachableError:
        raise
    except Exception as exc:  # a missing repo, no access, a hub error: all reported the same way
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AdapterFileError(f"{repo_id}: no such local folder, and fetching it from the Hugging Face hub "
                               f"failed: {reason}") from None


def _place_tensors(model: nn.Module, plan: AdapterPlan, tensors: dict[str, torch.Tensor], source: Path
                   ) -> list[tuple[str, str, str, torch.Tensor]]:
    """Match every tensor to (kind, module, part); raise on anything missing, unexpected or misshapen."""
    config = plan.config
    placed, unexpected, problems = [], [], []
    expected = {(module, part) for module in plan.layers for part in ("A", "B")}
    if config.use_dora:
        expected |= {(module, "magnitude") for module in plan.layers}
    saved_params = {f"{module}.{key}": (module, key) for module, wrapped in plan.saved_modules.items()
                    for key in (wrapped.original_module if isinstance(wrapped, TrainableCopy) else wrapped
                                ).state_dict()}
    found = set()
    for key, tensor in tensors.items():
        module, part = split_key(key)
        if part is not None and module in plan.layers and (module, part) in expected:
            layer = plan.layers[module]
            shape_a, shape_b = layer.factor_shapes(config.rank_for(module))
            want = {"A": shape_a, "B": shape_b, "magnitude": (layer.to_rows(layer.weight).shape[0],)}[part]
            shape = tuple(tensor.shape) if part != "magnitude" else (tensor.numel(),)
            if shape != tuple(want):
                hint = " (its rank differs from the config's r / rank_pattern)" if part != "magnitude" else ""
                problems.append(f"{key}: shape {tuple(tensor.shape)}, expected {tuple(want)}{hint}")
            if (module, part) in found:
                problems.append(f"{key}: a second tensor for {_key(module, layer, part)} (the file spells one key "
                                "with and without the base_model.model. prefix)")
            placed.append(("lora", module, part, tensor))
            found.add((module, part))
        elif part is None and module.endswith(_BASE_WEIGHT) and module.removesuffix(_BASE_WEIGHT) in plan.layers:
            # PEFT saves a targeted embedding's full base weight too; it must be this model's own.
            base_weight = plan.layers[module.removesuffix(_BASE_WEIGHT)].weight
            if tensor.shape != base_weight.shape or not torch.equal(tensor.to(base_weight.dtype), base_weight):
                problems.append(f"{key}: a different base weight than this model's (resized or retrained "
                                "embeddings); lorakit does not overwrite base weights when loading an adapter")
        elif part is None and key.removeprefix(PREFIX) in saved_params:
            module, param = saved_params[key.removeprefix(PREFIX)]
            placed.append(("copy", module, param, tensor))
            found.add((module, param))
        else:
            unexpected.append(key)
    missing = sorted(expected - found) + sorted(set(saved_params.values()) - found)
    if problems or missing or unexpected:
        lines = [f"{source} does not fit this {type(model).__name__} and the config beside it; nothing was loaded:"]
        lines += [f"  mismatch: {p}" for p in problems[:5]]
        lines += [f"  missing: {_key(m, plan.layers[m], p) if m in plan.layers else PREFIX + m + '.' + p}"
                  for m, p in missing[:5]]
        lines += [f"  unexpected (no targeted module takes it): {k}" for k in unexpected[:5]]
        count = len(problems) + len(missing) + len(unexpected)
        if count > 15:
            lines.append(f"  ... {count} problems in all")
        lines.append("Check that the adapter was trained for this base model (same architecture and sizes).")
        raise AdapterFileError("\n".join(lines))
    return placed


def _default_name(model: nn.Module, folder: Path) -> str:
    taken = getattr(model, STATE_ATTRIBUTE, None)
    if taken is None or "default" not in taken.configs:
        return "default"
    return re.sub(r"[^A-Za-z0-9_\-]", "_", folder.resolve().name) or "adapter"


def load_adapter(model: nn.Module, path: Union[str, Path, Adapter], name: Optional[str] = None,
                 trainable: bool = False) -> str:
    """Attach an adapter (an `Adapter`, a PEFT-format folder or a hub id) to `model`, activate it, return its name.

    name: defaults to "default", or to the folder's name when "default" is taken.
    trainable: leave the loaded weights trainable (to continue training); frozen by default.
    """
    adapter = path if isinstance(path, Adapter) else Adapter.read(path)
    folder = Path(adapter.source)
    name = name if name is not None else _default_name(model, folder)
    try:
        plan = plan_adapter(model, adapter.config, name, from_file=True)
    except LorakitError as exc:
        raise type(exc)(f"{adapter.source}: {exc}") from None
    placed = _place_tensors(model, plan, adapter.tensors, folder / WEIGHTS_NAME)
    install(model, plan, initialize=False)
    layers = dict(adapter_layers(model))
    copies = {module_name: module for module_name, module in model.named_modules() if isinstance(module, TrainableCopy)}
    with torch.no_grad():
        for kind, module, part, tensor in placed:
            if kind == "copy":
                _module_tensor(copies[module].modules_to_save[name], part).copy_(tensor)
                continue
            layer = layers[module]
            params = {"A": layer.lora_A, "B": layer.lora_B, "magnitude": layer.lora_magnitude_vector}[part]
            params[name].copy_(tensor.reshape(params[name].shape))
    state = getattr(model, STATE_ATTRIBUTE)
    if trainable:
        state.trainable.add(name)
    set_adapter(model, name)
    return name


def _module_tensor(module: nn.Module, key: str) -> torch.Tensor:
    try:
        return module.get_parameter(key)
    except AttributeError:
        return module.get_buffer(key)
