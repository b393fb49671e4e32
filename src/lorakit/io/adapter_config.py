"""`adapter_config.json` <-> `LoraConfig`, in PEFT's format.

Written as PEFT writes it (sorted keys, lists not sets, `peft_type: "LORA"`), and nothing PEFT or vLLM
would not understand. Read strictly: a PEFT feature lorakit does not implement is accepted only while
it is switched off; switched on, loading fails and names the field, rather than running an adapter that
silently computes something else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.core.config import LoraConfig
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.io.safetensors_file import atomic_write

CONFIG_NAME = "adapter_config.json"
_LORA_FIELDS = set(LoraConfig.__dataclass_fields__)
# Recorded by PEFT, no effect on the computation.
_METADATA_FIELDS = {"peft_type", "peft_version", "auto_mapping", "megatron_core", "qalora_group_size", "runtime_config"}


def _is_off(value: Any) -> bool:
    """None, False or an empty string/list/dict; 0 is not 'off' (layers_to_transform=0 selects layer 0)."""
    return value is None or value is False or (isinstance(value, (str, list, dict)) and not value)


def config_to_json(config: LoraConfig) -> str:
    data = config.to_dict()
    data["peft_type"] = "LORA"
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_config(path: Path, config: LoraConfig) -> None:
    text = config_to_json(config)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def config_from_dict(data: dict[str, Any], source: str) -> LoraConfig:
    """Build a LoraConfig from PEFT's JSON fields; errors name `source` and the field."""
    if not isinstance(data, dict):
        raise AdapterFileError(f"{source}: expected a JSON object, found {type(data).__name__}")
    peft_type = data.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterFileError(f"{source}: peft_type is {peft_type!r}; lorakit loads LoRA adapters only")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in data:
            raise AdapterFileError(f"{source}: field {key!r} is missing; an adapter config needs r, lora_alpha and "
                                   "target_modules (PEFT would silently fall back to defaults)")
    for key, value in data.items():
        if key not in _LORA_FIELDS and key not in _METADATA_FIELDS and not _is_off(value):
            raise AdapterFileError(
                f"{source}: field {key!r} = {value!r} switches on a PEFT feature lorakit does not support; the "
                "adapter would not compute what it was trained to. Remove the field only if you know it is safe.")
    try:
        return LoraConfig(**{key: value for key, value in data.items() if key in _LORA_FIELDS})
    except ConfigError as exc:
        raise AdapterFileError(f"{source}: {exc}") from None
    except TypeError as exc:  # a field of the wrong type that dataclass construction trips over
        raise AdapterFileError(f"{source}: {exc}") from None


def parse_json(data: bytes, source: str) -> Any:
    """A config file's JSON: duplicate keys (which parsers resolve differently) and deep nesting are refused."""
    from lorakit.io.safetensors_file import _no_duplicates

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise AdapterFileError(f"{source}: not a UTF-8 text file") from None
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{source}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except ValueError as exc:  # a duplicate key
        raise AdapterFileError(f"{source}: {exc}; each field may appear once") from None
    except RecursionError:
        raise AdapterFileError(f"{source}: the JSON is nested too deeply to be an adapter config") from None


def read_config(path: Path) -> LoraConfig:
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file; an adapter folder holds {CONFIG_NAME} and "
                               "adapter_model.safetensors")
    return config_from_dict(parse_json(path.read_bytes(), str(path)), str(path))
