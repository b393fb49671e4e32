"""Read a `lorakit train` settings file (YAML or JSON) the way people write one.

    lr: 1e-3                      # PyYAML reads this as the string "1e-3" (YAML 1.1 wants "1.0e-3"): a number here
    learning_rate: 1e-3           # Hugging Face / TRL spellings are read as lorakit's own (`lr`)
    per_device_train_batch_size: 8
    bf16: true                    # -> precision: bf16

Every value is checked against its setting's type; a wrong one is one line naming the file, the key and
what was expected. A key that is neither a setting nor a known alias gets "did you mean".
"""

from __future__ import annotations

import difflib
import math
import typing
from pathlib import Path
from typing import Any, Union

from lorakit.errors import TrainError

# Hugging Face TrainingArguments / TRL SFTConfig / PEFT LoraConfig / axolotl names -> TrainConfig fields.
ALIASES = {
    "learning_rate": "lr",
    "lora_r": "r",
    "rank": "r",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "num_train_epochs": "num_epochs",
    "epochs": "num_epochs",
    "max_seq_length": "max_length",
    "sequence_len": "max_length",
    "lr_scheduler_type": "schedule",
    "lr_scheduler": "schedule",
    "output_dir": "output",
    "model_name_or_path": "model",
    "base_model": "model",
    "train_file": "data",
    "dataset": "data",
    "dataset_path": "data",
    "eval_file": "eval_data",
    "validation_file": "eval_data",
    "lora_target_modules": "target_modules",
    "gradient_accumulation": "gradient_accumulation_steps",
    "hub_model_id": "push_to_hub",
    "dataset_text_field": "text_column",
    "lora_plus_lr_ratio": "lora_plus_ratio",
    "loraplus_lr_ratio": "lora_plus_ratio",
}
# HF spellings whose values translate, not just their names.
SCHEDULE_NAMES = {"constant_with_warmup": "constant", "cosine_with_restarts": None, "polynomial": None}


def read_config_file(path: Union[str, Path]) -> dict[str, Any]:
    """A YAML (or JSON) mapping of TrainConfig fields, aliases resolved, values of the fields' types."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TrainError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise TrainError(f"{path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise TrainError(f"{path} must hold a mapping of settings (key: value), not a {type(values).__name__}")
    _hf_push_switch(path, values)
    cleaned: dict[str, Any] = {}
    for key, value in values.items():
        for name, translated in _settings(path, str(key), value):
            if name in cleaned:
                raise TrainError(f"{path}: {key!r} sets {name!r}, which the file already sets; keep one")
            cleaned[name] = coerce(name, translated, where=f"{path}: {key}")
    return cleaned


def _settings(path: Path, key: str, value: Any) -> list[tuple[str, Any]]:
    """The (field, value) pairs one file key stands for."""
    from lorakit.train.config import FIELDS

    name = key.replace("-", "_")
    if name in FIELDS:
        return [(name, value)]
    if name in ALIASES:
        field = ALIASES[name]
        if field == "schedule" and isinstance(value, str) and value in SCHEDULE_NAMES:
            if SCHEDULE_NAMES[value] is None:
                raise TrainError(f"{path}: {key}: {value!r} is not a schedule lorakit has; use cosine, linear or "
                                 "constant")
            value = SCHEDULE_NAMES[value]
        return [(field, value)]
    if name in ("bf16", "fp16", "tf32"):
        return _precision(path, key, value)
    close = difflib.get_close_matches(name, [*FIELDS, *ALIASES], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known settings: {', '.join(FIELDS)}"
    raise TrainError(f"{path}: unknown setting {key!r}{hint}")


def _hf_push_switch(path: Path, values: dict) -> None:
    """HF's `push_to_hub: true` + `hub_model_id: OWNER/NAME` is lorakit's `push_to_hub: OWNER/NAME`."""
    switch = values.get("push_to_hub")
    if not isinstance(switch, bool):
        return
    del values["push_to_hub"]
    if switch and "hub_model_id" not in values:
        raise TrainError(f"{path}: push_to_hub: true needs the repository: hub_model_id: OWNER/NAME (or write "
                         "push_to_hub: OWNER/NAME)")
    if not switch:
        values.pop("hub_model_id", None)


def _precision(path: Path, key: str, value: Any) -> list[tuple[str, Any]]:
    """HF's `bf16: true` / `fp16: true` switches, as lorakit's `precision`."""
    if not isinstance(value, bool):
        raise TrainError(f"{path}: {key} must be true or false; got {value!r}")
    if key == "tf32" or not value:
        return []          # off: nothing to translate (tf32 is a CUDA matmul mode lorakit leaves to torch)
    if key == "fp16":
        raise TrainError(f"{path}: fp16: true is not supported (fp16 training needs loss scaling); use "
                         "precision: bf16 or precision: auto")
    return [("precision", "bf16")]


def coerce(name: str, value: Any, where: str) -> Any:
    """`value` as field `name`'s type: numbers written as strings ("1e-3") read as numbers, whole floats as
    ints (1e3 -> 1000); anything else that does not fit is a TrainError naming `where`."""
    from lorakit.train.config import TrainConfig

    if value is None:
        return None
    hint = typing.get_type_hints(TrainConfig)[name]
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if typing.get_origin(hint) is not Union:
        options = [hint]
    for option in options:
        converted = _as(option, value)
        if converted is not _NO:
            return converted
    expected = " or ".join(_describe(o) for o in options)
    raise TrainError(f"{where} must be {expected}; got {value!r}")


_NO = object()


def _as(kind, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
        return _NO
    if kind in (int, float):
        if isinstance(value, bool):
            return _NO
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip().replace("_", ""))
            except ValueError:
                return _NO
        if not isinstance(number, (int, float)) or not math.isfinite(number):
            return _NO
        if kind is int:
            return int(number) if float(number).is_integer() else _NO
        return float(number)
    if kind is str:
        return value if isinstance(value, str) else _NO
    if typing.get_origin(kind) is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        return _NO
    return value


def _describe(kind) -> str:
    if typing.get_origin(kind) is list:
        return "a list of strings"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(kind, str(kind))
