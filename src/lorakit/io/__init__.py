"""Adapter files: PEFT's folder format, read strictly into one `Adapter` value and written atomically."""

from lorakit.io.adapter import Adapter, LoraFactors
from lorakit.io.adapter_config import read_config
from lorakit.io.peft_format import adapter_state, load_adapter, save_adapter
from lorakit.io.safetensors_file import read_tensors

__all__ = ["Adapter", "LoraFactors", "load_adapter", "save_adapter", "adapter_state", "read_config", "read_tensors"]
