"""Int8 weight-only quantization, row by row (the weight half of LLM.int8(), as bitsandbytes stores it).

Each output row i keeps its absolute maximum s_i and the weights rounded to 127 levels either side:

    q_ij = round(w_ij · 127 / s_i)  (int8)        w_ij ≈ q_ij · s_i / 127

8 bits a weight plus 32 bits a row. Dequantizing multiplies by s_i · (1/127) in fp32, as bitsandbytes
does, and casts to the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INV_127 = 7.874015718698502e-3  # float32(1 / 127), bitsandbytes' constant


@dataclass
class Int8Weight:
    values: torch.Tensor     # int8 (out, in)
    row_absmax: torch.Tensor  # fp32 (out,)
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def num_bytes(self) -> int:
        return self.values.numel() + self.row_absmax.numel() * 4

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.values.float() * (self.row_absmax.view(-1, 1) * INV_127)).to(dtype or self.dtype)

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device) -> "Int8Weight":
        return Int8Weight(self.values.to(device), self.row_absmax.to(device), self.dtype)


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Row-wise absmax int8 of a (out, in) weight."""
    w = weight.detach()
    row_absmax = w.abs().max(dim=1).values.float()
    values = torch.round(w * (127.0 / row_absmax.clamp(min=1e-38).unsqueeze(-1))).to(torch.int8)
    return Int8Weight(values, row_absmax, weight.dtype)
