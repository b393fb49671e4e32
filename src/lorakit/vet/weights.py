"""Stage 2 of `lorakit vet`: per-module spectral statistics of ΔW = s·B A, from the r x r core.

With B (d_out, r) = Q_b R_b and Aᵀ (d_in, r) = Q_a R_a (thin QR), s·B A = Q_b (s R_b R_aᵀ) Q_aᵀ, and Q_b, Q_a
have orthonormal columns, so the singular values σ of ΔW are those of the r x r core M = s R_b R_aᵀ:
O((d_out + d_in) r²) work, never a d_out x d_in matrix. From σ:

  spectral norm    ||ΔW||₂ = σ₁
  Frobenius norm   ||ΔW||_F = sqrt(Σ σᵢ²)
  effective rank   exp(H(p)), p_i = σ_i / Σ σ_j (Roy & Vetterli 2007): 1 when one direction carries it all
  relative change  ||ΔW||_F / ||W||_F against the base weight W, when the base is given

Outliers are named by a robust z-score over the adapter's own modules, z = 0.6745 (x - median) / MAD, of
log ||ΔW||₂ and log relative change (warnings: one layer may rightly learn more), and flagged by absolute
caps: a change as large as the weight itself (relative change > MAX_RELATIVE_CHANGE) is no fine-tune.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from lorakit.io.adapter import Adapter, LoraFactors, a_few

OUTLIER_Z = 6.0               # robust z above which a module is named as an outlier
MAX_RELATIVE_CHANGE = 5.0     # ||ΔW||_F / ||W||_F: large models stay below 0.2; the tiny embedded one reaches ~1.4
MAX_SPECTRAL_NORM = 1e3       # ||ΔW||₂ of any module, without a base to compare with


def singular_values(factors: LoraFactors) -> torch.Tensor:
    """The r singular values of s·B A (descending), from QR of B and Aᵀ and the SVD of the r x r core."""
    a = factors.a.detach().double().reshape(factors.rank, -1)          # (r, d_in·k)
    b = factors.b.detach().double().reshape(factors.b.shape[0], -1)    # (d_out, r)
    _, r_b = torch.linalg.qr(b)                                        # (r, r) when d_out >= r
    _, r_a = torch.linalg.qr(a.T)                                      # (r, r) when d_in >= r
    return torch.linalg.svdvals(factors.scale * r_b @ r_a.T)


def effective_rank(sigma: torch.Tensor) -> float:
    """exp of the entropy of σ / Σσ; 0 for a zero update."""
    total = float(sigma.sum())
    if total <= 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def robust_z(values: Mapping[str, float]) -> dict[str, float]:
    """0.6745 (x - median) / MAD per entry; 0 everywhere when the MAD is 0 (all alike)."""
    if len(values) < 4:
        return {k: 0.0 for k in values}
    xs = torch.tensor(list(values.values()), dtype=torch.float64)
    median = xs.median()
    mad = (xs - median).abs().median()
    if float(mad) == 0:
        return {k: 0.0 for k in values}
    return {k: float(0.6745 * (v - median) / mad) for k, v in values.items()}


def check_weights(adapter: Adapter, base_weights: Optional[Mapping[str, torch.Tensor]] = None) -> dict:
    """The stage's report: per-module figures, outliers named, flags for absolute caps."""
    modules = {}
    for name, factors in adapter.modules.items():
        sigma = singular_values(factors)
        row = {"spectral_norm": float(sigma[0]) if len(sigma) else 0.0,
               "frobenius_norm": float(sigma.square().sum().sqrt()), "effective_rank": effective_rank(sigma)}
        weight = (base_weights or {}).get(name)
        if weight is not None:
            row["relative_change"] = row["frobenius_norm"] / max(float(weight.detach().double().norm()), 1e-12)
        modules[name] = row
    findings, warnings = [], []
    big = [n for n, m in modules.items() if m["spectral_norm"] > MAX_SPECTRAL_NORM]
    if big:
        findings.append(f"spectral norm of ΔW above {MAX_SPECTRAL_NORM:g} in {a_few(big)}")
    huge = [n for n, m in modules.items() if m.get("relative_change", 0.0) > MAX_RELATIVE_CHANGE]
    if huge:
        findings.append(f"||ΔW||_F / ||W||_F above {MAX_RELATIVE_CHANGE:g} in {a_few(huge)} "
                        f"(e.g. {modules[huge[0]]['relative_change']:.3g})")
    outliers = {}
    for key in ("spectral_norm", "relative_change"):
        logs = {n: math.log(max(m[key], 1e-30)) for n, m in modules.items() if key in m}
        for name, z in robust_z(logs).items():
            modules[name][f"{key}_z"] = round(z, 2)
            if z > OUTLIER_Z:
                outliers.setdefault(name, []).append(f"{key} z={z:.1f}")
    if outliers:
        warnings.append(f"outlier module(s) against the adapter's own: "
                        + "; ".join(f"{n} ({', '.join(w)})" for n, w in list(outliers.items())[:5]))
    summary = {k: max((m[k] for m in modules.values() if k in m), default=None)
               for k in ("spectral_norm", "relative_change")}
    return {"stage": "weights", "verdict": "flagged" if findings else "pass", "findings": findings,
            "warnings": warnings, "base_compared": base_weights is not None,
            "max_spectral_norm": summary["spectral_norm"], "max_relative_change": summary["relative_change"],
            "min_effective_rank": min((m["effective_rank"] for m in modules.values()), default=None),
            "modules": modules}
