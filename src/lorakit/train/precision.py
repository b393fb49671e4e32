"""Pick the compute precision (bf16 autocast where the device runs it faster, fp32 otherwise) and the
attention kernel that trains fastest in it.

On CUDA, bf16 pays whenever the GPU supports it. On a CPU it depends on the instruction set: cores with
AVX-512 BF16 or AMX multiply bf16 matrices several times faster than fp32, while cores without them
emulate bf16 and run it many times slower. Rather than guess from CPU flags, `bf16_is_faster` times one
matrix product of a transformer's shape in both precisions, once per process.

Attention: PyTorch's fused CPU attention (what transformers' "sdpa" runs there) takes its backward pass
about 4x longer in bf16 than "eager" attention's two bf16 batched matmuls and a softmax (8 sequences of
128 tokens, 8 heads of 64: 28 ms against 7 ms per layer, one core), a quarter of a whole training step.
Eager keeps the (B, heads, T, T) attention probabilities for the backward pass (6 bytes an entry: the fp32
softmax and its bf16 copy), which fused attention does not; memory.py counts them.
"""

from __future__ import annotations

import functools
import time

import torch


@functools.lru_cache(maxsize=None)
def bf16_is_faster(device_type: str = "cpu", size: int = 512, repeats: int = 5, margin: float = 1.2) -> bool:
    """True when a (size × 4size) @ (4size × size) bf16 product beats fp32 by `margin` on this device."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, 4 * size, generator=generator)
    b = torch.randn(4 * size, size, generator=generator)

    def best_time(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    return best_time(a, b) > margin * best_time(a.bfloat16(), b.bfloat16())


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" or "fp32" for this device; "fp32"/"bf16" are kept as asked."""
    if precision != "auto":
        return precision
    return "bf16" if bf16_is_faster(device.type) else "fp32"


def autocast(precision: str, device: torch.device):
    """The autocast context for a resolved precision (a no-op context for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


EAGER_MAX_LENGTH = 1024   # eager attention keeps (B, heads, T, T) probabilities: fine for short rows only


def training_attention(precision: str, device: torch.device, max_length: int) -> str:
    """The transformers attention implementation that trains fastest: "eager" on a CPU at bf16 for rows of
    up to EAGER_MAX_LENGTH tokens (PyTorch's fused attention has a slow bf16 backward there), else "sdpa"."""
    eager = device.type == "cpu" and precision == "bf16" and max_length <= EAGER_MAX_LENGTH
    return "eager" if eager else "sdpa"

