"""Which examples go together: a deterministic plan of batches for each epoch.

Each epoch shuffles the examples with its own generator, torch.Generator().manual_seed(seed + epoch), so
the same examples, settings and epoch give the same plan on any machine and after a resume, whatever the
global RNG did. With packing, rows are filled first-fit in shuffled order with whole examples of at most
max_length tokens in all; without it, a row is one example. A batch is batch_size consecutive rows (the
last one may be smaller). Every example appears exactly once per epoch.
"""

from __future__ import annotations

import torch

from lorakit.data.batches import Batch, collate_rows
from lorakit.data.formatting import Example
from lorakit.errors import DataError


class BatchPlan:
    """Batches of rows of example indices per epoch, and their collation into tensors."""

    def __init__(self, examples: list[Example], *, batch_size: int, max_length: int, pad_id: int, seed: int,
                 packing: bool = True):
        if not examples:
            raise DataError("there are no examples to batch. Check the data file.")
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}.")
        for example in examples:
            if len(example.input_ids) > max_length:
                raise DataError(f"{example.source}: {len(example.input_ids)} tokens, longer than max_length "
                                f"{max_length}. Tokenize with the same max_length as the plan.")
        self.examples, self.batch_size, self.max_length = examples, batch_size, max_length
        self.pad_id, self.seed, self.packing = pad_id, seed, packing

    def epoch(self, epoch: int) -> list[list[list[int]]]:
        """Batches -> rows -> example indices for `epoch` (0-based)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.examples), generator=generator).tolist()
        rows = self._pack(order) if self.packing else [[index] for index in order]
        return [rows[start:start + self.batch_size] for start in range(0, len(rows), self.batch_size)]

    def collate(self, rows: list[list[int]]) -> Batch:
        """The tensors for one batch of `epoch`'s rows."""
        # Packed rows are nearly full, so padding them to max_length costs little and gives one shape;
        # unpacked batches are rounded up to a multiple of 64 tokens (or max_length, when smaller).
        multiple = self.max_length if self.packing else min(64, self.max_length)
        return collate_rows([[self.examples[index] for index in row] for row in rows], self.pad_id, multiple)

    def _pack(self, order: list[int]) -> list[list[int]]:
        """First fit: each example goes into the first row with room for it, else opens a new row."""
        lengths = [len(example.input_ids) for example in self.examples]
        shortest = min(lengths)
        rows, room, open_rows = [], [], []           # open_rows: rows that still fit the shortest example
        for index in order:
            target = next((r for r in open_rows if room[r] >= lengths[index]), None)
            if target is None:
                target = len(rows)
                rows.append([])
                room.append(self.max_length)
                open_rows.append(target)
            rows[target].append(index)
            room[target] -= lengths[index]
            if room[target] < shortest:
                open_rows.remove(target)
        return rows
