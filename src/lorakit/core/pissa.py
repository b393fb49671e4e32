"""PiSSA: start the adapter on the principal singular directions of W (Meng et al., 2024).

With the SVD of the rows view W = U S Vᵀ and scale s:

    A₀ = diag(√(S_r / s)) V_rᵀ        (r, d_in)
    B₀ = U_r diag(√(S_r / s))         (d_out, r)
    W_res = W − s · B₀ A₀             (the base keeps only the residual)

so W_res + s·B₀A₀ = W and training starts from the base model's exact output, with the adapter holding
the most important directions. Because the base in memory is W_res, an adapter saved as it is would only
fit that residual base. `save_adapter` therefore writes the standard equivalent for the original W:

    ΔW = s·(B A − B₀ A₀) = s · [B, −B₀] [A; A₀]      (rank 2r, same scale: alpha doubles with r)
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from lorakit.core.layers import LoraLayer


def pissa_init(layer: LoraLayer, name: str, niter: Optional[int]) -> None:
    """Initialise A, B from W's top-r singular triplets and leave the residual in the base weight."""
    weight = layer.weight
    rows = layer.to_rows(weight.detach().float())
    r, scale = layer.rank(name), layer.scaling[name]
    if niter is None:
        u, s_values, vh = torch.linalg.svd(rows, full_matrices=False)
        u_r, s_r, vh_r = u[:, :r], s_values[:r] / scale, vh[:r]
    else:
        u_r, s_r, v_r = torch.svd_lowrank(rows, r, niter=niter)
        s_r, vh_r = s_r / scale, v_r.t()
    a0 = torch.diag(torch.sqrt(s_r)) @ vh_r
    b0 = u_r @ torch.diag(torch.sqrt(s_r))
    with torch.no_grad():
        layer.lora_A[name].copy_(a0)
        layer.lora_B[name].copy_(b0)
        weight.copy_(layer.from_rows(rows - scale * b0 @ a0).to(weight.dtype))
    layer.pissa_initial[name] = (a0.to(layer.lora_A[name].dtype), b0.to(layer.lora_B[name].dtype))


def pissa_to_standard(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank 2r whose update on the original W equals this PiSSA adapter's on W_res."""
    a, b = layer.lora_A[name].detach(), layer.lora_B[name].detach()
    a0, b0 = (t.to(a.device) for t in layer.pissa_initial[name])
    return torch.cat([a, a0], dim=0), torch.cat([b, -b0], dim=1)


def converted_alpha(alpha: float, use_rslora: bool) -> float:
    """The alpha that keeps the scale s when r doubles: s = α/r → 2α/2r; rsLoRA s = α/√r → √2α/√(2r)."""
    return alpha * math.sqrt(2) if use_rslora else alpha * 2
