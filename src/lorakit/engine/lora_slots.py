"""Resident adapters stacked in slots, and the per-batch LoRA that lets every row use its own.

For each layer and fused group (see `layout.py`) with P projections and total output width O, the slots
hold

    a       (S, P, R, in)   A of each projection, rank along R
    bt      (S, R, O)       B^T of every projection side by side (projection p owns columns part_end[p-1]..)
    scale   (S, P)          s = alpha / r (or alpha / sqrt(r), after rank_pattern / alpha_pattern), fp32

with S slots and R the largest rank resident (grown in steps of 8, zero-padded: smaller ranks add exact
zeros). A batch whose row i uses slot[i] (or none) adds, for each projection p,

    y_i[:, cols_p] += scale[slot[i], p] · (x_i A_p^T) B_p^T

Two paths compute it, picked by `batch`: on a CPU the compiled kernel (`lora_kernel.py`) reads the
slots in place (bf16 activations are widened to fp32 around it); elsewhere, or where the kernel cannot
be built, the batched products of `lora_gathered.py` (the reference path, also what the GPU runs)
gather the batch's factors once.

Precision of the stacks (`adapter_dtype`): "auto" holds them in the narrowest dtype in which every
resident adapter's factors are exact: bf16, else fp16 (adapters saved in bf16 or fp16), else fp32, so
auto never rounds an adapter and a 16-bit adapter costs half the bytes per decode step; the stacks are
converted (exactly) when an adapter arrives that the current dtype cannot hold, or when a narrower one
would now do. "bf16" always (rounds fp32 adapters to bf16); "fp32" always. Off the CPU, "auto" chooses
between the model's dtype and fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from lorakit.engine.adapter_files import AdapterWeights
from lorakit.engine.layout import GROUPS, PROJECTION_GROUP, DecoderLayout
from lorakit.engine.lora_gathered import GatheredLora
from lorakit.engine.lora_kernel import SlotLora, cpu_kernel

RANK_STEP = 8  # slot ranks grow in steps of 8
ADAPTER_DTYPES = ("auto", "fp32", "bf16")

LoraBatch = Union[SlotLora, GatheredLora]  # apply(layer, group, x, y) -> y + the batch's LoRA update

__all__ = ["LoraSlots", "LoraBatch", "GroupStacks", "ADAPTER_DTYPES"]


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


@dataclass
class GroupStacks:
    """One layer's and group's slots (shapes in the module docstring)."""

    a: torch.Tensor
    bt: torch.Tensor
    scale: torch.Tensor
    part_end: torch.Tensor  # (P,) int64 on the CPU: cumulative out_features

    @property
    def columns(self) -> list[tuple[int, int]]:
        """[start, end) of each projection's columns in bt (and in the group's output)."""
        ends = self.part_end.tolist()
        return list(zip([0] + ends[:-1], ends))


class LoraSlots:
    """S slots of adapter factors for every layer and group, on the model's device."""

    def __init__(self, layout: DecoderLayout, num_slots: int, device: torch.device, model_dtype: torch.dtype,
                 adapter_dtype: str = "auto"):
        if adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got {adapter_dtype!r}")
        self.layout, self.num_slots, self.device, self.adapter_dtype = layout, num_slots, device, adapter_dtype
        # auto's candidates, narrowest first; the kernel reads fp32, bf16 and fp16 slots
        self.narrow_dtypes = (torch.bfloat16, torch.float16) if device.type == "cpu" else (model_dtype,)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(adapter_dtype, self.narrow_dtypes[0])
        self.kernel = cpu_kernel() if device.type == "cpu" else None
        self.rank, self.dtype = 0, dtype
        self.slot_rank = [0] * num_slots
        self.slot_fits: list[frozenset] = [frozenset()] * num_slots  # the dtypes each resident adapter is exact in
        self.stacks: list[dict[str, GroupStacks]] = []
        self.version = 0  # bumps whenever slot contents change; invalidates per-batch state
        self._reallocate(RANK_STEP, dtype)

    @property
    def path(self) -> str:
        """Which path computes the LoRA update: "cpu-kernel" or "batched-products"."""
        return "cpu-kernel" if self.kernel is not None else "batched-products"

    def _reallocate(self, rank: int, dtype: torch.dtype) -> None:
        """Stacks with room for `rank` in `dtype`, keeping what the slots hold (exactly: `write` picks a dtype
        that every resident adapter fits)."""
        old, old_rank = self.stacks, self.rank
        self.stacks = []
        for layer in range(self.layout.num_layers):
            per_group = {}
            for group, shape in self.layout.shapes.items():
                parts, total = len(shape.out_features), sum(shape.out_features)
                stacks = GroupStacks(
                    a=torch.zeros(self.num_slots, parts, rank, shape.in_features, device=self.device, dtype=dtype),
                    bt=torch.zeros(self.num_slots, rank, total, device=self.device, dtype=dtype),
                    scale=torch.zeros(self.num_slots, parts, device=self.device, dtype=torch.float32),
                    part_end=torch.tensor(shape.out_features, dtype=torch.long).cumsum(0))
                if old_rank:
                    previous = old[layer][group]
                    stacks.a[:, :, :old_rank] = previous.a
                    stacks.bt[:, :old_rank] = previous.bt
                    stacks.scale.copy_(previous.scale)
                per_group[group] = stacks
            self.stacks.append(per_group)
        self.rank, self.dtype = rank, dtype
        self.version += 1

    def write(self, slot: int, adapter: AdapterWeights) -> None:
        """Put `adapter` into `slot`, replacing what was there."""
        rank, dtype = self.rank, self.dtype
        if adapter.rank > rank:
            rank = _round_up(adapter.rank, RANK_STEP)
        fits = frozenset()
        if self.adapter_dtype == "auto":
            fits = frozenset(d for d in self.narrow_dtypes if adapter.fits(d)) | {torch.float32}
            others = [self.slot_fits[k] for k in range(self.num_slots) if k != slot and self.slot_rank[k]]
            feasible = [d for d in (*self.narrow_dtypes, torch.float32)
                        if d in fits and all(d in other for other in others)]
            # the narrowest; the current dtype if it is as narrow (no needless bf16 <-> fp16 conversions)
            same_width = self.dtype in feasible and self.dtype.itemsize == feasible[0].itemsize
            dtype = self.dtype if same_width else feasible[0]
        if (rank, dtype) != (self.rank, self.dtype):
            self._reallocate(rank, dtype)
        for layer in range(self.layout.num_layers):
            for group in GROUPS:
                stacks = self.stacks[layer][group]
                stacks.a[slot].zero_()
                stacks.bt[slot].zero_()
                stacks.scale[slot].zero_()
        for (layer, projection), (a, b, scale) in adapter.factors.items():
            group, part = PROJECTION_GROUP[projection]
            stacks = self.stacks[layer][group]
            r = a.shape[0]
            start, end = stacks.columns[part]
            stacks.a[slot, part, :r] = a.to(self.device, self.dtype)
            stacks.bt[slot, :r, start:end] = b.t().to(self.device, self.dtype)
            stacks.scale[slot, part] = scale
        self.slot_rank[slot], self.slot_fits[slot] = adapter.rank, fits
        self.version += 1

    def batch(self, row_slots: list[int]) -> Optional[LoraBatch]:
        """The LoRA of a batch whose row i uses slot row_slots[i] (-1: no adapter); None if no row has one."""
        with_adapter = [i for i, s in enumerate(row_slots) if s >= 0]
        if not with_adapter:
            return None
        rank = max(self.slot_rank[row_slots[i]] for i in with_adapter)
        if self.kernel is not None:
            return SlotLora(self, row_slots, rank)
        return GatheredLora.from_slots(self, row_slots, rank)

    def delta(self, slot: int) -> list[dict[str, torch.Tensor]]:
        """Per layer and group, the weight update s·B A (total_out, in) of the adapter in `slot`, fp32: to merge."""
        r = self.slot_rank[slot]
        deltas = []
        for per_group in self.stacks:
            layer = {}
            for group, stacks in per_group.items():
                a = stacks.a[slot, :, :r].float()               # (P, r, in)
                bt = stacks.bt[slot, :r].float()                # (r, O)
                layer[group] = torch.cat([(bt[:, start:end].t() * stacks.scale[slot, part]) @ a[part]
                                          for part, (start, end) in enumerate(stacks.columns)])
            deltas.append(layer)
        return deltas
