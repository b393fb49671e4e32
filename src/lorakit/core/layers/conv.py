"""LoRA beside `nn.Conv1d`, `nn.Conv2d` and `nn.Conv3d`.

    h = conv(x, W) + s · conv1x1(conv(x, A), B)    A: (r, c_in, *k), B: (c_out, r, 1, ...)

A has the base's kernel, stride, padding and dilation; B mixes the r channels back to c_out. In the rows
view (c_out, c_in·∏k) this is the same product B_rows @ A_rows as a linear layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.layers.base import LoraLayer

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoraConv(LoraLayer):
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.conv = _CONV_FN[base_layer.weight.dim() - 2]

    def factor_shapes(self, r: int):
        c_out, c_in, *kernel = self.weight.shape
        return (r, c_in, *kernel), (c_out, r, *([1] * len(kernel)))

    def to_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.reshape(self.weight.shape)

    def factor_rows(self, name: str):
        b, a = self.lora_B[name], self.lora_A[name]
        return b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)

    def lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b, base = self.lora_A[name], self.lora_B[name], self.base_layer
        x = self.dropout(x, name)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        mid = self.conv(x, a, None, base.stride, base.padding, base.dilation)
        return self.conv(mid, b) * self.scaling[name]

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return self.conv(x, base.weight, None, base.stride, base.padding, base.dilation, base.groups)

    def per_output(self, vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return vector.view(1, -1, *([1] * (like.dim() - 2)))
