"""Per-module arithmetic of composition: weighted LoRA updates summed exactly, truncated, or pruned.

Every input i contributes to a module the update `ΔW_i = w_i · s_i · B_i A_i`, with A_i (r_i, d_in) and
B_i (d_out, r_i) flattened to matrices (a convolution's A (r, c_in, k, k) is (r, c_in·k·k), its
B (d_out, r, 1, 1) is (d_out, r)) and s_i its own scale (alpha/r, alpha/sqrt(r) with rsLoRA, after the
patterns). The functions here take those terms and return factors (B, A) of the result, scale 1:

    concatenated  B = [w_1 s_1 B_1 | ... | w_n s_n B_n],  A = [A_1; ...; A_n]   (rank Σ r_i, exact:
                  B A = Σ w_i s_i B_i A_i term by term, no cross terms)
    truncated     the best rank-R approximation of that exact sum (Eckart-Young), from the SVD of an
                  (Σ r_i × Σ r_i) core: B = Q_B R_B, A^T = Q_A R_A  =>  B A = Q_B (R_B R_A^T) Q_A^T, so the
                  big matrix is never formed; also returns the share of ‖ΔW‖²_F the R directions keep
    pruned        `magnitude_prune`, `ties`, `dare_linear`, `dare_ties` on the full ΔW_i (as the papers
                  define them on task vectors), then truncated to rank R, since the pruned sum is full-rank

Pruning follows the task-vector papers and PEFT's merge_utils, but on ΔW_i rather than on A and B apart:
magnitude keeps the top `density` share of |ΔW_i|'s entries; DARE keeps each entry with probability
`density` and divides by it; TIES elects each entry's sign as the sign of Σ_i of the pruned, weighted
terms and averages the terms that agree with it (disjoint merge). Everything is computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

PRUNING_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class Term:
    """One input's part of one module: ΔW_i = weight · B @ A (weight folds in w_i and s_i); B (d_out, r), A (r, d_in)."""
    b: torch.Tensor
    a: torch.Tensor
    weight: float

    def full(self) -> torch.Tensor:
        return self.weight * (self.b.double() @ self.a.double())            # (d_out, d_in)


def concatenated(terms: list[Term], ranks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (d_out, Σ ranks), A (Σ ranks, d_in)) with B A = Σ_i terms[i]; term i occupies ranks[i] columns of B
    (rows of A), zero-padded past its own rank, so every module of a composed adapter has one rank."""
    d_out, d_in = terms[0].b.shape[0], terms[0].a.shape[1]
    b = torch.zeros(d_out, sum(ranks), dtype=torch.float64)
    a = torch.zeros(sum(ranks), d_in, dtype=torch.float64)
    start = 0
    for term, width in zip(terms, ranks):
        r = term.a.shape[0]
        b[:, start:start + r] = term.weight * term.b.double()
        a[start:start + r] = term.a.double()
        start += width
    return b, a


def truncated(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B', A', kept): the best rank-`rank` factors of B A (zero-padded if B A has fewer directions) and the
    share of ‖B A‖²_F they keep (1.0 for a zero update)."""
    q_b, r_b = torch.linalg.qr(b)                                          # (d_out, K), (K, K)
    q_a, r_a = torch.linalg.qr(a.T)                                        # (d_in, K), (K, K)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)                               # core (K, K)
    return _factor(q_b @ u, s, vh @ q_a.T, rank)


def full_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`truncated` for an update given as a full matrix (d_out, d_in)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return _factor(u, s, vh, rank)


def _factor(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """B = U_R diag(√S_R), A = diag(√S_R) Vh_R: the singular values split evenly between the factors."""
    keep = min(rank, s.numel())
    energy = float((s ** 2).sum())
    kept = float((s[:keep] ** 2).sum()) / energy if energy > 0 else 1.0
    root = s[:keep].sqrt()
    b = torch.zeros(u.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, vh.shape[1], dtype=torch.float64)
    b[:, :keep] = u[:, :keep] * root
    a[:keep] = root[:, None] * vh[:keep]
    return b, a, kept


def pruned(terms: list[Term], method: str, density: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Σ_i of the full ΔW_i combined by `method` (see the module's docstring): a (d_out, d_in) matrix."""
    deltas = [term.full() for term in terms]
    if method in ("magnitude_prune", "ties"):
        deltas = [_top_magnitude(d, density) for d in deltas]
    else:                                                                  # dare_linear, dare_ties
        deltas = [_random_drop(d, density, generator) for d in deltas]
    stacked = torch.stack(deltas)                                          # (n, d_out, d_in)
    if method in ("magnitude_prune", "dare_linear"):
        return stacked.sum(0)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = stacked.sign() == elected
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def _top_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return delta
    keep = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[delta.abs().flatten().topk(keep).indices] = True
    return delta * mask.view_as(delta)


def _random_drop(delta: torch.Tensor, density: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    if density >= 1:
        return delta
    mask = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density
    return delta * mask / density
