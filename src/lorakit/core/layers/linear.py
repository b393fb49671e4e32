"""LoRA beside `nn.Linear` and transformers' GPT-2 style `Conv1D`.

    h = W x + b + s · B (A x)        A: (r, d_in), B: (d_out, r), x: (..., d_in)

`Conv1D` is a linear layer that stores its weight as (d_in, d_out) ("fan_in_fan_out"); only the rows
view differs. The update is added with one fused `addmm` (result + s · mid @ Bᵀ) instead of a matmul
followed by an elementwise add over the whole output.

While training a plain `nn.Linear` with vanilla LoRA (no dropout), the whole layer is one autograd node,
`_LoraLinearFunction`, whose backward folds the adapter's input gradient into the base's with one more
`addmm` (∂x = g W + g_mid A) instead of two matmuls and an add over (M, d_in); everything else is the
reference path (`LoraLayer.forward`: base layer, then the variant), which it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch.autograd.function import once_differentiable

from lorakit.core.layers.base import LoraLayer
from lorakit.core.variants.lora import LoraVariant


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

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._runs
        dtype = self._fused_training_dtype(x, name) if name is not None and not (args or kwargs) else None
        if dtype is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        return _LoraLinearFunction.apply(x, base.weight, base.bias, self.lora_A[name], self.lora_B[name],
                                         self.scaling[name], dtype)

    def _fused_training_dtype(self, x: torch.Tensor, name: str):
        """The dtype `_LoraLinearFunction` computes in, or None where the reference path must run: no
        gradients wanted, another variant, active dropout, a base that is not exactly a frozen nn.Linear
        (quantized, hooked, trainable), or mixed dtypes without autocast."""
        base = self.base_layer
        if (not torch.is_grad_enabled() or type(self.variants[name]) is not LoraVariant
                or (self.dropout_p[name] > 0 and self.training) or type(base) is not nn.Linear
                or base._forward_hooks or base._forward_pre_hooks
                or any(p.requires_grad for p in base.parameters(recurse=False))):
            return None
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        a = self.lora_A[name]
        return x.dtype if x.dtype == base.weight.dtype == a.dtype == self.lora_B[name].dtype else None

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


class _LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + bias + s · (x Aᵀ) Bᵀ in `dtype`, W and bias frozen. With g = ∂L/∂y (M, d_out), M = tokens:

        g_mid = s · g B    (M, r)        ∂A = g_midᵀ x    ∂B = s · (midᵀ g)ᵀ    ∂x = g W + g_mid A  (one addmm)

    the same products autograd runs on the reference path, in the same dtypes; only the two input-gradient
    terms are summed inside the addmm rather than after it."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling, dtype):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)                                       # (M, d_in)
        w, a_c, b_c = weight.to(dtype), a.to(dtype), b.to(dtype)
        mid = x2 @ a_c.t()                                                              # (M, r)
        base = F.linear(x2, w, None if bias is None else bias.to(dtype))               # (M, d_out)
        out = torch.addmm(base, mid, b_c.t(), alpha=scaling)
        ctx.save_for_backward(x2, w, a_c, b_c, mid)
        ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = scaling, x.shape, x.dtype, a.dtype, b.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x2, w, a_c, b_c, mid = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)                               # (M, d_out)
        g_mid = (g @ b_c) * ctx.scaling                                                 # (M, r)
        grad_a = (g_mid.t() @ x2).to(ctx.a_dtype)                                       # (r, d_in)
        grad_b = ((mid.t() @ g) * ctx.scaling).t().to(ctx.b_dtype)                      # (d_out, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addmm(g @ w, g_mid, a_c).view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None
