"""NF4 with double quantization (QLoRA), in plain PyTorch, laid out exactly as bitsandbytes lays it out.

A weight W (any shape, n values) is cut into blocks of 64 consecutive values. Each block b keeps its
absolute maximum m_b and, per value, the index of the nearest NF4 level to w / m_b:

    w ≈ NF4[q_i] · m_b                       4 bits a value, two to a byte (even index in the high nibble)

Double quantization stores the m_b themselves in 8 bits: minus their mean c, in blocks of 256 with their
own absolute maximum M_k, as the index of the nearest value of the dynamic 8-bit map:

    m_b ≈ DYN[p_b] · M_k + c                 8 bits a block of 64 (0.125 bit a value) + 32 bits per 16384

so a quantized value costs 4 + 8/64 + 32/(64·256) = 4.127 bits. Dequantizing runs in fp32 and casts to
the compute dtype at the end, as bitsandbytes does; `quant.backends` checks that both give the same
tensor for the same input.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lorakit.quant.codes import dynamic_code, nf4_code

BLOCK = 64
SCALE_BLOCK = 256


def _nearest(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted `code` for every value (ties to the upper entry)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(values, midpoints, out_int32=True)


def _blockwise_absmax(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-block absolute maxima (blocks,), values scaled into [-1, 1]) for a flat fp32 tensor."""
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % block)).view(-1, block)
    absmax = padded.abs().max(dim=1).values
    scaled = torch.clamp(padded * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1)
    return absmax, scaled.view(-1)[:n]


@functools.lru_cache(maxsize=None)
def byte_pairs(device: str = "cpu") -> torch.Tensor:
    """(256, 2) fp32: the two NF4 levels a packed byte holds (high nibble first)."""
    code = nf4_code(device)
    byte = torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], 1)


@dataclass
class NF4Weight:
    """A weight in NF4 with double-quantized block scales; see the module docstring for the layout."""

    packed: torch.Tensor        # uint8 (ceil(n/2),)
    scale_index: torch.Tensor   # uint8 (blocks,)      p_b
    scale_absmax: torch.Tensor  # fp32 (ceil(blocks/256),)  M_k
    scale_offset: torch.Tensor  # fp32 ()              c
    shape: torch.Size
    dtype: torch.dtype          # the dtype it was quantized from, and dequantizes to by default

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale_index, self.scale_absmax,
                                                          self.scale_offset))

    def block_absmax(self) -> torch.Tensor:
        """m_b, fp32 (blocks,)."""
        code = dynamic_code(str(self.packed.device))
        values = code[self.scale_index.int()]
        blocks = values.numel()
        scales = self.scale_absmax.repeat_interleave(SCALE_BLOCK)[:blocks]
        return values * scales + self.scale_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        n = self.shape.numel()
        values = byte_pairs(str(self.packed.device))[self.packed.int()].view(-1)[:n]  # one lookup per byte
        absmax = self.block_absmax()
        values = torch.nn.functional.pad(values, (0, -n % BLOCK)).view(-1, BLOCK) * absmax.view(-1, 1)
        return values.view(-1)[:n].view(self.shape).to(dtype or self.dtype)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device) -> "NF4Weight":
        return NF4Weight(self.packed.to(device), self.scale_index.to(device), self.scale_absmax.to(device),
                         self.scale_offset.to(device), self.shape, self.dtype)


def quantize_nf4(weight: torch.Tensor) -> NF4Weight:
    """Quantize any float tensor to NF4 with blocks of 64 and double-quantized scales (blocks of 256)."""
    flat = weight.detach().reshape(-1).float()
    absmax, scaled = _blockwise_absmax(flat, BLOCK)
    if scaled.numel() % 2:  # an odd count: the last byte's low nibble holds a zero, as bitsandbytes writes it
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    indices = _nearest(scaled, nf4_code(str(flat.device))).to(torch.uint8)
    return with_double_quantized_scales((indices[0::2] << 4) | indices[1::2], absmax, weight)


def with_double_quantized_scales(packed: torch.Tensor, absmax: torch.Tensor, weight: torch.Tensor) -> NF4Weight:
    """An NF4Weight from packed 4-bit indices and fp32 block maxima, the maxima quantized to 8 bits: each
    block maximum minus their mean, scaled by its group of 256's maximum, to the nearest dynamic-map entry.
    (bitsandbytes' own C quantizer approximates "nearest" and differs on a few values in ten thousand, so
    both backends use this one.)"""
    offset = absmax.mean()
    scale_absmax, scale_scaled = _blockwise_absmax(absmax - offset, SCALE_BLOCK)
    scale_index = _nearest(scale_scaled, dynamic_code(str(absmax.device))).to(torch.uint8)
    return NF4Weight(packed, scale_index, scale_absmax, offset, weight.shape, weight.dtype)
