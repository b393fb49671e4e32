"""Resident adapters stacked in slots, and the per-batch LoRA that lets every row use its own.

For each layer and fused group (see `layout.py`) with P projections and total output width O, the slots
hold

    a       (S, P, R, in)   A of each projection, rank along R
    bt      (S, R, O)       B^T of every projection side by side (projection p owns columns part_end[p-1]..)
    scale   (S, P)          s = alpha / r (or alpha / sqrt(r), after rank_pattern / alpha_pattern), fp32

with S slots and R the largest rank resident (grown in steps of 8, zero-padded: smaller ranks add exact
zeros). S starts small and doubles as adapters arrive, up to `max_slots` and while the stacks stay within
`memory_budget` bytes, so every adapter a server is given stays resident when memory allows. A batch
whose row i uses slot[i] (or none) adds, for each projection p,

    y_i[:, cols_p] += scale[slot[i], p] · (x_i A_p^T) B_p^T

and a row on a mixture, the sum of that over its (slot, weight) pairs, each term times its weight (see
`mixture.py`).

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

from lorakit.engine.served_adapter import ServedAdapter
from lorakit.engine.layout import PROJECTION_GROUP, DecoderLayout
from lorakit.engine.lora_gathered import GatheredLora
from lorakit.engine.lora_kernel import SlotLora, cpu_kernel
from lorakit.engine.mixture import RowLora, row_pairs
from lorakit.errors import AdapterError
from lorakit.models import PRECISIONS

RANK_STEP = 8  # slot ranks grow in steps of 8
INITIAL_SLOTS = 8
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

    def __init__(self, layout: DecoderLayout, max_slots: int, device: torch.device, model_dtype: torch.dtype,
                 adapter_dtype: str = "auto", memory_budget: Optional[int] = None):
        if adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got {adapter_dtype!r}")
        self.layout, self.max_slots, self.device, self.adapter_dtype = layout, max_slots, device, adapter_dtype
        self.memory_budget = memory_budget
        # auto's candidates, narrowest first; the kernel reads fp32, bf16 and fp16 slots
        self.narrow_dtypes = (torch.bfloat16, torch.float16) if device.type == "cpu" else (model_dtype,)
        dtype = PRECISIONS.get(adapter_dtype, self.narrow_dtypes[0])
        self.kernel = cpu_kernel() if device.type == "cpu" else None
        self.num_slots, self.rank, self.dtype = 0, 0, dtype
        self.slot_rank: list[int] = []
        self.slot_fits: list[frozenset] = []  # the dtypes each resident adapter is exact in
        self.stacks: list[dict[str, GroupStacks]] = []
        self.version = 0  # bumps whenever slot contents change; invalidates per-batch state
        initial = min(max_slots, INITIAL_SLOTS)
        while initial > 1 and not self._within_budget(initial, RANK_STEP):
            initial -= 1
        self._reallocate(initial, RANK_STEP, dtype)

    # --- memory --------------------------------------------------------------------------------------
    def bytes_for(self, num_slots: int, rank: int, dtype: torch.dtype) -> int:
        """Bytes the stacks take with `num_slots` slots of rank `rank` in `dtype`."""
        per_slot = sum(len(shape.out_features) * rank * shape.in_features + rank * sum(shape.out_features)
                       for shape in self.layout.shapes.values())
        return self.layout.num_layers * num_slots * per_slot * dtype.itemsize

    def _within_budget(self, num_slots: int, rank: int, dtype: Optional[torch.dtype] = None) -> bool:
        """Whether the stacks fit the budget; under "auto" counted in fp32, the widest dtype they may switch to."""
        dtype = dtype or (torch.float32 if self.adapter_dtype == "auto" else self.dtype)
        return self.memory_budget is None or self.bytes_for(num_slots, rank, dtype) <= self.memory_budget

    def check_fits(self, adapter: ServedAdapter) -> None:
        """Refuse an adapter that could never be resident: one slot of its rank exceeds the budget."""
        rank = max(self.rank, _round_up(adapter.rank, RANK_STEP))
        if not self._within_budget(1, rank):
            raise AdapterError(f"an adapter of rank {adapter.rank} needs {self.bytes_for(1, rank, torch.float32):,} "
                               f"bytes of slot memory, above the budget of {self.memory_budget:,} bytes; raise "
                               "--adapter-memory")

    def grow(self, incoming: ServedAdapter) -> bool:
        """Add slots (double, else one more) if `max_slots` and the budget allow; whether it grew."""
        rank = max(self.rank, _round_up(incoming.rank, RANK_STEP))
        for count in (min(self.max_slots, 2 * self.num_slots), min(self.max_slots, self.num_slots + 1)):
            if count > self.num_slots and self._within_budget(count, rank):
                self._reallocate(count, self.rank, self.dtype)
                return True
        return False

    @property
    def path(self) -> str:
        """Which path computes the LoRA update: "cpu-kernel" or "batched-products"."""
        return "cpu-kernel" if self.kernel is not None else "batched-products"

    def _reallocate(self, num_slots: int, rank: int, dtype: torch.dtype) -> None:
        """Stacks with `num_slots` slots of room for `rank` in `dtype`, keeping what the slots hold (exactly:
        `write` picks a dtype that every resident adapter fits)."""
        old, old_slots, old_rank = self.stacks, self.num_slots, self.rank
        self.stacks = []
        for layer in range(self.layout.num_layers):
            per_group = {}
            for group, shape in self.layout.shapes.items():
                parts, total = len(shape.out_features), sum(shape.out_features)
                stacks = GroupStacks(
                    a=torch.zeros(num_slots, parts, rank, shape.in_features, device=self.device, dtype=dtype),
                    bt=torch.zeros(num_slots, rank, total, device=self.device, dtype=dtype),
                    scale=torch.zeros(num_slots, parts, device=self.device, dtype=torch.float32),
                    part_end=torch.tensor(shape.out_features, dtype=torch.long).cumsum(0))
                if old_rank:
                    previous = old[layer][group]
                    stacks.a[:old_slots, :, :old_rank] = previous.a
                    stacks.bt[:old_slots, :old_rank] = previous.bt
                    stacks.scale[:old_slots] = previous.scale
                per_group[group] = stacks
            self.stacks.append(per_group)
        self.slot_rank += [0] * (num_slots - old_slots)
        self.slot_fits += [frozenset()] * (num_slots - old_slots)
        self.num_slots, self.rank, self.dtype = num_slots, rank, dtype
        self.version += 1

    def clear(self, slot: int) -> None:
        """Empty `slot` (its rows add nothing)."""
        for per_group in self.stacks:
            for stacks in per_group.values():
                stacks.a[slot].zero_()
                stacks.bt[slot].zero_()
                stacks.scale[slot].zero_()
        self.slot_rank[slot], self.slot_fits[slot] = 0, frozenset()
        self.version += 1

    def write(self, slot: int, adapter: ServedAdapter) -> None:
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
            if not self._within_budget(self.num_slots, rank):
                raise AdapterError(f"holding rank {adapter.rank} in {self.num_slots} slots needs "
                                   f"{self.bytes_for(self.num_slots, rank, dtype):,} bytes, above the slots' budget of "
                                   f"{self.memory_budget:,}; raise --adapter-memory or --max-lora-rank's budget")
            self._reallocate(self.num_slots, rank, dtype)
        self.clear(slot)
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

    def batch(self, rows: list[RowLora], active: Optional[torch.Tensor] = None) -> Optional[LoraBatch]:
        """The LoRA of a batch whose row i uses slot rows[i] (-1: no adapter) or the (slot, weight) pairs of a
        mixture (`mixture.py`); None if no row has one. active (B, T) bool: the tokens the adapters act on
        (an activated LoRA's from its invocation on; None: all), for the compiled kernel only."""
        used = [slot for row in rows for slot, _ in row_pairs(row)]
        if not used:
            return None
        rank = max(self.slot_rank[slot] for slot in used)
        if self.kernel is not None:
            return SlotLora(self, rows, rank, active)
        if active is not None:
            raise ValueError("only the compiled kernel leaves tokens out; run those positions as the base")
        return GatheredLora.from_slots(self, rows, rank)

    def delta(self, row: RowLora) -> list[dict[str, torch.Tensor]]:
        """Per layer and group, the weight update Σ_j w_j s_j B_j A_j (total_out, in) of a slot (weight 1) or of
        a mixture's (slot, weight) pairs, fp32: to merge."""
        pairs = row_pairs(row)
        deltas = []
        for per_group in self.stacks:
            layer = {}
            for group, stacks in per_group.items():
                layer[group] = sum(weight * self._group_delta(stacks, slot) for slot, weight in pairs)
            deltas.append(layer)
        return deltas

    def _group_delta(self, stacks: GroupStacks, slot: int) -> torch.Tensor:
        """s·B A (total_out, in) of every projection of one group, for the adapter in `slot`, fp32."""
        r = self.slot_rank[slot]
        a = stacks.a[slot, :, :r].float()               # (P, r, in)
        bt = stacks.bt[slot, :r].float()                # (r, O)
        return torch.cat([(bt[:, start:end].t() * stacks.scale[slot, part]) @ a[part]
                          for part, (start, end) in enumerate(stacks.columns)])
