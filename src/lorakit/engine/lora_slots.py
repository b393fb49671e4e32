"""Resident adapters stacked in slots, and the batched LoRA product that lets every row use its own.

For each layer and fused group (see `layout.py`) the slots hold

    A_stack    (S, P, R, in)    the A factors of the group's P projections, stacked along the rank
    B_stack_p  (S, out_p, R)    s·B of projection p, one stack per projection

with S slots and R the largest rank resident (grown on demand, zero-padded). A batch whose rows use
adapters `slot[i]` (or none) adds, for each row i with an adapter,

    u_i = x_i @ A_slot[i]^T                 (T, in) -> (T, P·r)    one shrink for the whole group
    y_i[:, cols_p] += u_i[:, p] @ B_p,slot[i]^T   (T, r) -> (T, out_p)

as batched products over the rows (`torch.bmm`): the BGMV idea of Punica / S-LoRA, written with gathers
and batched products instead of a loop over adapters. Ranks are cut to the largest rank *in the batch*, so a batch of
r=8 adapters pays for r=8 even when an r=64 adapter is resident; smaller ranks inside a batch are zero
padding, which adds exact zeros. Rows without an adapter are left out of the product entirely, and a
batch with no adapter skips it. The gathered factors depend only on which slots the rows use, so they
are built once per change of the batch and reused by every decode step in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lorakit.engine.adapter_files import AdapterWeights
from lorakit.engine.layout import GROUPS, PROJECTION_GROUP, DecoderLayout

RANK_STEP = 8  # slot ranks grow in steps of 8


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


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
    """One batch's factors, per layer and group: A^T (n, in, P·r) and, per run of equal-width projections,
    B^T (n·k, r, out_p) ordered (row, part)."""

    rows: Optional[torch.Tensor]  # indices of the rows that have an adapter; None: all rows do
    rank: int
    factors: list[dict[str, tuple[torch.Tensor, list[tuple[int, int, torch.Tensor]]]]]

    def update(self, layer: int, group: str, x: torch.Tensor) -> torch.Tensor:
        """The LoRA update (B, T, out) of `group` at `layer` for input x (B, T, in); zero on rows without one."""
        a_t, runs = self.factors[layer][group]
        rows = x if self.rows is None else x.index_select(0, self.rows)
        n, t, r = rows.shape[0], rows.shape[1], self.rank
        u = torch.bmm(rows.to(a_t.dtype), a_t)  # (n, T, P·r)
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

    def single_adapter_delta(self) -> list[dict[str, torch.Tensor]]:
        """Per layer and group, the weight update (out, in) of row 0's adapter: to merge a one-adapter batch."""
        r = self.rank
        deltas = []
        for per_group in self.factors:
            layer = {}
            for group, (a_t, runs) in per_group.items():
                blocks = []
                for first, count, b_t in runs:
                    for k in range(count):
                        part = first + k
                        blocks.append((a_t[0][:, part * r:(part + 1) * r] @ b_t[k]).t())  # row 0 is entries 0..k-1
                layer[group] = torch.cat(blocks)
            deltas.append(layer)
        return deltas


class LoraSlots:
    """S slots of adapter factors for every layer and group, on the model's device (fp32 on a CPU, else the
    model's dtype)."""

    def __init__(self, layout: DecoderLayout, num_slots: int, device: torch.device, dtype: torch.dtype):
        # Tiny bf16 batched products are several times slower than fp32 ones on CPUs; adapters stay fp32 there.
        dtype = torch.float32 if device.type == "cpu" else dtype
        self.layout, self.num_slots, self.device, self.dtype = layout, num_slots, device, dtype
        self.rank = 0
        self.slot_rank = [0] * num_slots
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, list[torch.Tensor]]] = []
        self.version = 0  # bumps whenever slot contents change; invalidates gathered batches
        self._grow(RANK_STEP)

    def _grow(self, rank: int) -> None:
        """Reallocate every stack with room for `rank`, keeping what the slots hold."""
        old_a, old_b, old_rank = self.a, self.b, self.rank
        self.a, self.b = [], []
        for layer in range(self.layout.num_layers):
            layer_a, layer_b = {}, {}
            for group, shape in self.layout.shapes.items():
                parts = len(shape.out_features)
                a = torch.zeros(self.num_slots, parts, rank, shape.in_features, device=self.device, dtype=self.dtype)
                bs = [torch.zeros(self.num_slots, out, rank, device=self.device, dtype=self.dtype)
                      for out in shape.out_features]
                if old_rank:
                    a[:, :, :old_rank] = old_a[layer][group]
                    for b, old in zip(bs, old_b[layer][group]):
                        b[..., :old_rank] = old
                layer_a[group], layer_b[group] = a, bs
            self.a.append(layer_a)
            self.b.append(layer_b)
        self.rank = rank
        self.version += 1

    def write(self, slot: int, adapter: AdapterWeights) -> None:
        """Put `adapter` into `slot`, replacing what was there."""
        if adapter.rank > self.rank:
            self._grow(_round_up(adapter.rank, RANK_STEP))
        for layer in range(self.layout.num_layers):
            for group in GROUPS:
                self.a[layer][group][slot].zero_()
                for b in self.b[layer][group]:
                    b[slot].zero_()
        for (layer, projection), (a, b) in adapter.factors.items():
            group, part = PROJECTION_GROUP[projection]
            r = a.shape[0]
            self.a[layer][group][slot, part, :r] = a.to(self.device, self.dtype)
            self.b[layer][group][part][slot, :, :r] = b.to(self.device, self.dtype)
        self.slot_rank[slot] = adapter.rank
        self.version += 1

    def gather(self, row_slots: list[int]) -> Optional[GatheredLora]:
        """The factors for a batch whose row i uses slot row_slots[i] (-1: no adapter); None if no row has one."""
        with_adapter = [i for i, s in enumerate(row_slots) if s >= 0]
        if not with_adapter:
            return None
        slots = torch.tensor([row_slots[i] for i in with_adapter], device=self.device)
        rows = None if len(with_adapter) == len(row_slots) else torch.tensor(with_adapter, device=self.device)
        r = max(self.slot_rank[row_slots[i]] for i in with_adapter)
        factors = []
        for layer in range(self.layout.num_layers):
            per_group = {}
            for group, shape in self.layout.shapes.items():
                n, parts = len(with_adapter), len(shape.out_features)
                a = self.a[layer][group][:, :, :r].index_select(0, slots)  # (n, P, r, in)
                a_t = a.reshape(n, parts * r, shape.in_features).transpose(1, 2).contiguous()
                runs = []
                for first, count in equal_width_runs(shape.out_features):
                    b_run = torch.stack([self.b[layer][group][first + k][:, :, :r].index_select(0, slots)
                                         for k in range(count)], 1)  # (n, k, out_p, r)
                    runs.append((first, count, b_run.transpose(2, 3).reshape(n * count, r, -1).contiguous()))
                per_group[group] = (a_t, runs)
            factors.append(per_group)
        return GatheredLora(rows, r, factors)
