"""LoRA beside `nn.Embedding`.

    h = W[x] + s · (Aᵀ[x]) Bᵀ        W: (vocab, dim), A: (r, vocab), B: (dim, r)

PEFT's orientation is kept (A indexed by token, B projecting to the embedding) and its saved key names
are `lora_embedding_A` / `lora_embedding_B`. No dropout on token ids. A starts at zero and B random, the
reverse of a linear layer, so the update still starts at zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.layers.base import LoraLayer


class LoraEmbedding(LoraLayer):
    def factor_shapes(self, r: int):
        vocab, dim = self.weight.shape
        return (r, vocab), (dim, r)

    def to_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    from_rows = to_rows

    def factor_rows(self, name: str):
        return self.lora_B[name], self.lora_A[name]

    def reset_factors(self, name: str, init) -> None:
        a, b = self.lora_A[name], self.lora_B[name]
        with torch.no_grad():
            nn.init.normal_(b)
            if init is False:
                nn.init.normal_(a)
            else:
                nn.init.zeros_(a)

    def dropout(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x

    def lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        after_a = F.embedding(x, self.lora_A[name].T, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)  # (..., r)
        return (after_a @ self.lora_B[name].T) * self.scaling[name]

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)
