"""Resident adapters stacked in slots, and the batched LoRA product that lets every row use its own.

For each layer and fused group (see `layout.py`) the slots hold

    A_stack  (S, P, R, in)     the A factors of the group's P projections
    B_stack  (S, out, P, R)    s·B of projection p in rows [off_p, off_p + out_p) and columns p; zero elsewhere

with S slots and R the largest rank resident (grown on demand, zero-padded). A batch whose rows use
adapters `slot[i]` (or none) adds, for each row i with an adapter,

    y_i += (x_i @ A_slot[i]^T) @ B_slot[i]^T          x_i: (T, in) -> (T, P·r) -> (T, out)

as two `torch.bmm` calls over the rows: the BGMV idea of Punica / S-LoRA, written with gathers and batched
products instead of a loop over adapters. Ranks are cut to the largest rank *in the batch*, so a batch of
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


@dataclass
class GatheredLora:
    """The factors of one batch, per layer and group: A^T (n, in, P·r) and B^T (n, P·r, out)."""

    rows: Optional[torch.Tensor]  # indices of the rows that have an adapter; None: all rows do
    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + the LoRA update of `group` at `layer`; x: (B, T, in), y: (B, T, out)."""
        a_t, b_t = self.factors[layer][group]
        if self.rows is None:
            return torch.baddbmm(y, torch.bmm(x, a_t), b_t)
        update = torch.bmm(torch.bmm(x.index_select(0, self.rows), a_t), b_t)
        return y.index_add(0, self.rows, update)


class LoraSlots:
    """S slots of adapter factors for every layer and group, on the model's device and dtype."""

    def __init__(self, layout: DecoderLayout, num_slots: int, device: torch.device, dtype: torch.dtype):
        self.layout, self.num_slots, self.device, self.dtype = layout, num_slots, device, dtype
        self.rank = 0
        self.slot_rank = [0] * num_slots
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, torch.Tensor]] = []
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
                b = torch.zeros(self.num_slots, shape.total_out, parts, rank, device=self.device, dtype=self.dtype)
                if old_rank:
                    a[:, :, :old_rank] = old_a[layer][group]
                    b[..., :old_rank] = old_b[layer][group]
                layer_a[group], layer_b[group] = a, b
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
                self.b[layer][group][slot].zero_()
        for (layer, projection), (a, b) in adapter.factors.items():
            group, part = PROJECTION_GROUP[projection]
            r = a.shape[0]
            offset = self.layout.shapes[group].out_offset(part)
            self.a[layer][group][slot, part, :r] = a.to(self.device, self.dtype)
            self.b[layer][group][slot, offset:offset + b.shape[0], part, :r] = b.to(self.device, self.dtype)
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
                b = self.b[layer][group][..., :r].index_select(0, slots)   # (n, out, P, r)
                per_group[group] = (a.reshape(n, parts * r, shape.in_features).transpose(1, 2).contiguous(),
                                    b.reshape(n, shape.total_out, parts * r).transpose(1, 2).contiguous())
            factors.append(per_group)
        return GatheredLora(rows, factors)
