"""lorakit: train, check, store, combine and serve LoRA adapters.

    from lorakit import LoraConfig, add_adapter, save_adapter, load_adapter
    add_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    ...train...
    save_adapter(model, "my-adapter")          # a PEFT-format folder: loads in PEFT and vLLM too
    lorakit.compose({"a": "runs/a", "b": "runs/b"}, [0.7, -0.3]).save("mix")   # exact ΔW = Σ wᵢ sᵢ BᵢAᵢ
"""

from lorakit.core import (LoraConfig, active_adapter, add_adapter, delete_adapter, disable_adapters,
                          list_adapters, merge_adapter, merge_and_unload, parameter_report, set_adapter,
                          trainable_parameters, unmerge_adapter)
from lorakit.compose import compose  # the function; the package stays importable as lorakit.compose.*
from lorakit.errors import AdapterError, AdapterFileError, ConfigError, LorakitError, TargetError
from lorakit.io import Adapter, load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = ["Adapter", "compose", "LoraConfig", "add_adapter", "load_adapter", "save_adapter", "set_adapter", "active_adapter",
           "list_adapters", "delete_adapter", "disable_adapters", "merge_adapter", "unmerge_adapter",
           "merge_and_unload", "trainable_parameters", "parameter_report", "LorakitError", "ConfigError",
           "TargetError", "AdapterError", "AdapterFileError"]
