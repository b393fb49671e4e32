"""`QuantizedLinear`: a frozen linear layer whose weight is stored in NF4 or int8 and dequantized per use.

    y = x · dequantize(W_q)^T + b          (QLoRA: Y = X · doubleDequant(c1, c2, W_NF4) + X L1 L2)

Compute runs in the layer's compute dtype (the weight's dtype before quantization, or bf16 under
autocast), never in 4 bits. The backward pass dequantizes again instead of keeping the full-precision
weight alive between forward and backward, which is what keeps training memory near the 4-bit size;
the weight gets no gradient (the base is frozen; LoRA adapters wrap this layer and train beside it).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.quant import bitsandbytes_backend
from lorakit.quant.int8 import Int8Weight, quantize_int8
from lorakit.quant.nf4 import NF4Weight, quantize_nf4

QuantizedWeight = Union[NF4Weight, Int8Weight]
METHODS = ("nf4", "int8")
BACKENDS = ("torch", "bitsandbytes")


def quantize(weight: torch.Tensor, method: str, backend: str) -> QuantizedWeight:
    if backend == "bitsandbytes":
        return (bitsandbytes_backend.quantize_nf4 if method == "nf4" else bitsandbytes_backend.quantize_int8)(weight)
    return (quantize_nf4 if method == "nf4" else quantize_int8)(weight)


def dequantize(q: QuantizedWeight, dtype: torch.dtype, backend: str) -> torch.Tensor:
    if backend == "bitsandbytes":
        bnb = bitsandbytes_backend.dequantize_nf4 if isinstance(q, NF4Weight) else bitsandbytes_backend.dequantize_int8
        return bnb(q, dtype)
    return q.dequantize(dtype)


def follow_module_move(module: nn.Module, fn) -> nn.Module:
    """For `_apply` of a module holding `quantized` and `compute_dtype`: `.to(device)` moves the quantized data;
    `.to(dtype)` / `.bfloat16()` change the compute dtype only (the stored codes never change)."""
    probe = fn(torch.empty(0, dtype=module.compute_dtype, device=module.quantized.device))
    module.quantized = module.quantized.to(probe.device)
    if probe.is_floating_point():
        module.compute_dtype = probe.dtype
    return module


class _QuantizedMatmul(torch.autograd.Function):
    """x (..., in) -> x W^T, dequantizing W in the forward pass and again in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantized(grad.dtype), None


class QuantizedLinear(nn.Module):
    """A frozen nn.Linear replacement holding its weight in NF4 or int8 (see the module docstring)."""

    is_quantized_linear = True  # what LoRA targeting recognises (core depends on torch alone)

    def __init__(self, linear: nn.Linear, method: str, backend: str = "torch",
                 quantized: Optional[QuantizedWeight] = None):
        """`quantized`: an already quantized copy of linear.weight to share (a head tied to its embedding)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.method = method
        self.compute_dtype = linear.weight.dtype
        self.quantized = quantized if quantized is not None else quantize(linear.weight, method, backend)
        # Dequantize through the backend only where it agrees with the reference path on this very weight.
        self.backend = backend
        if backend != "torch" and not torch.equal(dequantize(self.quantized, self.compute_dtype, backend),
                                                  self.quantized.dequantize(self.compute_dtype)):
            self.backend = "torch"
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.cached: Optional[torch.Tensor] = None  # set only inside `dequantized_while_inferring`

    @property
    def num_bytes(self) -> int:
        """Bytes of the quantized weight (and the bias, if any)."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.quantized.num_bytes + bias

    def dequantized(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        if self.cached is not None and self.cached.dtype == dtype:
            return self.cached
        return dequantize(self.quantized, dtype, self.backend)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (out, in): a fresh tensor, for reading (shapes, merging by export)."""
        return self.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = _QuantizedMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        return follow_module_move(self, fn)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={self.method}, backend={self.backend}, compute_dtype={self.compute_dtype}")


@contextlib.contextmanager
def dequantized_while_inferring(model: nn.Module, budget_bytes: int):
    """Keep every QuantizedLinear's weight dequantized for the duration (generation calls each layer once per
    token), if all of them together fit in `budget_bytes`; otherwise change nothing. Freed on exit."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    needed = sum(m.in_features * m.out_features * torch.finfo(m.compute_dtype).bits // 8 for m in layers)
    if not layers or needed > budget_bytes:
        yield False
        return
    try:
        for layer in layers:
            layer.cached = layer.dequantized()
        yield True
    finally:
        for layer in layers:
            layer.cached = None
