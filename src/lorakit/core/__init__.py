"""The LoRA core: config, adapter layers, injection, merging. Depends on torch (and RE2 for name patterns)."""

from lorakit.core.adapters import (active_adapter, add_adapter, delete_adapter, disable_adapters, list_adapters,
                                   set_adapter)
from lorakit.core.config import LoraConfig
from lorakit.core.merge import merge_adapter, merge_and_unload, unmerge_adapter
from lorakit.core.params import parameter_report, trainable_parameters

__all__ = ["LoraConfig", "add_adapter", "set_adapter", "active_adapter", "list_adapters", "delete_adapter",
           "disable_adapters", "merge_adapter", "unmerge_adapter", "merge_and_unload", "trainable_parameters",
           "parameter_report"]
