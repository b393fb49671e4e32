"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024).

The adapted weight is split into a learned magnitude m (one per output row) and a direction:

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row        (row norms; ‖·‖ is detached, as in the paper §4.3)

so, with n = ‖W + s·BA‖_row and x the (dropped-out) input,

    h = b + (m/n) ⊙ (W x + s · B A x)  =  result + (m/n − 1) ⊙ W x + (m/n) ⊙ s·BAx

m starts at ‖W‖_row (computed with the initial A, B), so an untrained DoRA adapter is the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.core.variants.lora import LoraVariant


class DoraVariant(LoraVariant):
    name = "dora"

    def create(self, layer, name: str) -> None:
        d_out = layer.to_rows(layer.weight).shape[0]
        layer.lora_magnitude_vector[name] = nn.Parameter(
            torch.empty(d_out, device=layer.weight.device, dtype=layer.lora_A[name].dtype))

    def init(self, layer, name: str) -> None:
        with torch.no_grad():
            layer.lora_magnitude_vector[name].copy_(self.weight_norm(layer, name, layer.weight))

    @staticmethod
    def weight_norm(layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """n = ‖W + s·BA‖ per output row, fp32, detached: (d_out,)."""
        with torch.no_grad():
            rows = layer.to_rows(weight.detach().float()) + layer.delta_rows(name)
            return torch.linalg.norm(rows, dim=1)

    def forward(self, layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        magnitude = layer.lora_magnitude_vector[name]
        scale = layer.per_output(magnitude / self.weight_norm(layer, name, layer.weight), result)
        if layer.dropout_p[name] > 0 and layer.training:
            x = layer.dropout(x, name)
            weight_term = layer.base_output_without_bias(x)
        else:
            bias = layer.base_bias
            weight_term = result if bias is None else result - layer.per_output(bias, result)
        lora = layer.lora_output(x, name)
        return (result + (scale - 1) * weight_term + scale * lora).to(result.dtype)

    def merge(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        norm = self.weight_norm(layer, name, weight)
        layer.dora_merge_norms[name] = norm  # unmerge needs the norm of the weight before merging
        factor = (layer.lora_magnitude_vector[name].detach().float() / norm)[:, None]
        return layer.from_rows(factor * (layer.to_rows(weight) + layer.delta_rows(name)))

    def unmerge(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        norm = layer.dora_merge_norms.pop(name)
        factor = (layer.lora_magnitude_vector[name].detach().float() / norm)[:, None]
        return layer.from_rows(layer.to_rows(weight) / factor - layer.delta_rows(name))
