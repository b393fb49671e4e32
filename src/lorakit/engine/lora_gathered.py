"""The multi-adapter LoRA update as batched products over the rows: the reference path, and the GPU's.

A row carries K (slot, weight) pairs (one adapter: one pair at weight 1; a mixture: up to K, padded with
unused pairs; see `mixture.py`). The factors are gathered once per change of the batch, in fp32 on a CPU
(small bf16 batched products are several times slower there than fp32), the pairs of a row side by side
along the rank, so a mixture is one wider rank (K·r):

    A^T    (n, in, P·K·r)                    every projection of the group, every pair of the row
    B^T    (n·k, K·r, out_p)  per run of k projections with the same out_features, ordered (row, part),
                              with w·s of each pair folded in (unused pairs: zeros)

and each call computes, for every row i,

    u_i = x_i @ A^T_i                        (T, in) -> (T, P·K·r)   one shrink for the whole group
    y_i[:, cols_p] += u_i[:, p] @ B^T_p,i    (T, K·r) -> (T, out_p)  = Σ_j w_ij s_j (x_i A_j^T) B_j^T

as `torch.bmm` over the rows: the BGMV idea of Punica / S-LoRA, written with gathers and batched products
instead of a loop over adapters. Ranks are cut to the largest rank in the batch. Rows without an adapter
are left out of the products.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from lorakit.engine.mixture import RowLora, pair_tensors

if TYPE_CHECKING:
    from lorakit.engine.lora_slots import LoraSlots


def equal_width_runs(out_features: tuple[int, ...]) -> list[tuple[int, int]]:
    """(first part, count) of each run of consecutive projections with the same out_features.

    q, k, v of multi-head attention form one run; with grouped-query attention q is one and k, v another;
    gate and up always form one. A run's expansions are one batched product over (rows x parts).
    """
    runs: list[tuple[int, int]] = []
    for part, width in enumerate(out_features):
        if runs and out_features[runs[-1][0]] == width:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((part, 1))
    return runs


@dataclass
class GatheredLora:
    """One batch's gathered factors per layer and group: A^T and, per run, (first part, count, B^T)."""

    rows: Optional[torch.Tensor]  # indices of the rows that have an adapter; None: all rows do
    rank: int                     # columns of u per projection: K·r
    factors: list[dict[str, tuple[torch.Tensor, list[tuple[int, int, torch.Tensor]]]]]

    @classmethod
    def from_slots(cls, slots: "LoraSlots", rows: list[RowLora], rank: int) -> "GatheredLora":
        """The factors of the pairs `rows` name (per row a slot, -1: none, or its (slot, weight) pairs), ranks
        cut to `rank`."""
        slot, weight = pair_tensors(rows)                        # (N, K)
        with_adapter = (slot >= 0).any(1).nonzero().flatten().tolist()
        slot, weight = slot[with_adapter], weight[with_adapter]  # (n, K)
        used = (slot >= 0).to(slots.device)
        index = slot.clamp(min=0).flatten().to(slots.device)     # unused pairs read slot 0, then zeroed
        rows_index = None if len(with_adapter) == len(rows) else torch.tensor(with_adapter, device=slots.device)
        dtype = torch.float32 if slots.device.type == "cpu" else slots.dtype
        (n, k), r = slot.shape, rank
        factors = []
        for per_group in slots.stacks:
            gathered = {}
            for group, stacks in per_group.items():
                parts, in_features = stacks.a.shape[1], stacks.a.shape[3]
                a = stacks.a[:, :, :r].index_select(0, index).to(dtype).view(n, k, parts, r, in_features)
                a = a.masked_fill(~used[:, :, None, None, None], 0)      # (n, K, P, r, in)
                a_t = a.transpose(1, 2).reshape(n, parts * k * r, in_features).transpose(1, 2).contiguous()
                bt = stacks.bt[:, :r].index_select(0, index).to(dtype).view(n, k, r, -1)  # (n, K, r, O)
                bt = bt.masked_fill(~used[:, :, None, None], 0)
                scale = (stacks.scale.index_select(0, index).view(n, k, parts)
                         * weight.to(stacks.scale.device)[:, :, None]).to(dtype)  # (n, K, P): w·s in fp32
                columns = stacks.columns
                runs = []
                for first, count in equal_width_runs(tuple(end - start for start, end in columns)):
                    start, width = columns[first][0], columns[first][1] - columns[first][0]
                    b_run = torch.stack([bt[..., start + p * width:start + (p + 1) * width]
                                         * scale[:, :, first + p, None, None] for p in range(count)], 1)
                    runs.append((first, count, b_run.reshape(n * count, k * r, width).contiguous()))  # (n·k', K·r, w)
                gathered[group] = (a_t, runs)
            factors.append(gathered)
        return cls(rows_index, k * rank, factors)

    def update(self, layer: int, group: str, x: torch.Tensor) -> torch.Tensor:
        """The LoRA update (B, T, out) of `group` at `layer` for input x (B, T, in); zero on rows without one."""
        a_t, runs = self.factors[layer][group]
        rows = x if self.rows is None else x.index_select(0, self.rows)
        n, t, r = rows.shape[0], rows.shape[1], self.rank
        u = torch.bmm(rows.to(a_t.dtype), a_t)  # (n, T, P·r), r here the row's K·r
        pieces = []
        for first, count, b_t in runs:
            u_run = u[..., first * r:(first + count) * r]
            if count > 1:  # parts become batch entries: (n, T, k·r) -> (n·k, T, r)
                u_run = u_run.reshape(n, t, count, r).transpose(1, 2).reshape(n * count, t, r)
            z = torch.bmm(u_run, b_t)  # (n·k, T, out_p)
            if count > 1:
                z = z.reshape(n, count, t, -1).transpose(1, 2).reshape(n, t, -1)
            pieces.append(z)
        update = (pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)).to(x.dtype)
        if self.rows is None:
            return update
        return torch.zeros(*x.shape[:-1], update.shape[-1], dtype=x.dtype, device=x.device).index_copy_(
            0, self.rows, update)

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + the update of `group` at `layer` for input x."""
        return y + self.update(layer, group, x)
