"""`TrainableCopy`: a module trained in full, one copy per adapter (PEFT's `modules_to_save`).

Used for small heads that LoRA cannot usefully adapt, e.g. a freshly initialised classifier. The
original stays frozen; the active adapter's copy runs instead of it. Saved under the module's plain key
(`base_model.model.classifier.weight`), as PEFT saves it.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from torch import nn


class TrainableCopy(nn.Module):
    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()  # PEFT's attribute name: adapter name -> copy
        self.active_adapter: Optional[str] = None
        self.adapters_disabled = False

    def add(self, name: str) -> None:
        duplicate = copy.deepcopy(self.original_module)
        for param in duplicate.parameters():
            param.requires_grad_(True)
        self.modules_to_save[name] = duplicate

    def remove(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def set_active(self, name: Optional[str]) -> None:
        self.active_adapter = name if name in self.modules_to_save else None

    def set_disabled(self, disabled: bool) -> None:
        self.adapters_disabled = disabled

    def running_module(self) -> nn.Module:
        name = self.active_adapter
        if self.adapters_disabled or name is None:
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.running_module()(*args, **kwargs)
