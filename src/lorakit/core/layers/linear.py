"""LoRA beside `nn.Linear` and transformers' GPT-2 style `Conv1D`.

    h = W x + b + s · B (A x)        A: (r, d_in), B: (d_out, r), x: (..., d_in)

`Conv1D` is a linear layer that stores its weight as (d_in, d_out) ("fan_in_fan_out"); only the rows
view differs. The update is added with one fused `addmm` (result + s · mid @ Bᵀ) instead of a matmul
followed by an elementwise add over the whole output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.layers.base import LoraLayer


def is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D, recognised without importing transformers (core needs torch only)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


class LoraLinear(LoraLayer):
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_transformers_conv1d(base_layer)
        d_in, d_out = base_layer.weight.shape if self.fan_in_fan_out else base_layer.weight.shape[::-1]
        self.in_features, self.out_features = d_in, d_out

    def factor_shapes(self, r: int):
        return (r, self.in_features), (self.out_features, r)

    def to_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    from_rows = to_rows  # a transpose is its own inverse

    def factor_rows(self, name: str):
        return self.lora_B[name], self.lora_A[name]

    def supports_init(self, init) -> bool:
        return True

    def _input_for(self, x: torch.Tensor, a: torch.Tensor, autocast: bool) -> torch.Tensor:
        return x if autocast or x.dtype == a.dtype else x.to(a.dtype)

    def lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        x = self._input_for(self.dropout(x, name), a, torch.is_autocast_enabled(x.device.type))
        return F.linear(F.linear(x, a), b) * self.scaling[name]

    def add_lora(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        autocast = torch.is_autocast_enabled(x.device.type)
        mid = F.linear(self._input_for(self.dropout(x, name), a, autocast), a)  # (..., r)
        if autocast or result.dtype == mid.dtype == b.dtype:
            fused = torch.addmm(result.reshape(-1, self.out_features), mid.reshape(-1, mid.shape[-1]), b.t(),
                                alpha=self.scaling[name])
            return fused.view(result.shape)
        return result + (F.linear(mid, b) * self.scaling[name]).to(result.dtype)

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.to_rows(self.weight)
        return F.linear(x.to(weight.dtype), weight)
