"""Vanilla LoRA, and the seam every variant implements.

A variant decides how adapter `name` of a LoraLayer changes the forward pass and how it merges into the
base weight. Vanilla LoRA is one line each: `h + s·BAx` and `W ± s·BA`. Variants (DoRA now, aLoRA later)
subclass this instead of adding flags to every layer.
"""

from __future__ import annotations

import torch


class LoraVariant:
    """Vanilla LoRA: h = W x + s · B A x; merged W' = W + s · B A."""

    name = "lora"

    def create(self, layer, name: str) -> None:
        """Create any parameters beyond A and B (uninitialised)."""

    def init(self, layer, name: str) -> None:
        """Initialise those extra parameters, after A and B are initialised."""

    def forward(self, layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return layer.add_lora(x, result, name)

    def merge(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight (fp32, base layout) from the current one."""
        return weight + layer.delta_weight(name)

    def unmerge(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight - layer.delta_weight(name)
