"""The value tables 4-bit and 8-bit blockwise quantization map indices to.

NF4 (QLoRA, Dettmers et al. 2023): 16 levels at quantiles of N(0, 1), scaled to [-1, 1] with an exact
zero; these are the float32 values bitsandbytes uses, so both backends dequantize to the same numbers.
The dynamic 8-bit map (Dettmers 2015) quantizes the per-block scales of NF4 again ("double
quantization"): a sign, a dynamic exponent and a shrinking fraction, 256 values in [-1, 1].
"""

from __future__ import annotations

import functools

import torch

NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


@functools.lru_cache(maxsize=None)
def nf4_code(device: str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def dynamic_code(device: str = "cpu", max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The signed dynamic map: for exponent i, 2^i + 1 evenly spaced fractions in [0.1, 1] times 10^(i-6)."""
    values: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        boundaries = torch.linspace(0.1, 1, 2 ** (i + non_sign_bits - max_exponent_bits) + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        values += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2 ** total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)
