"""The running sequences' keys and values: one contiguous row each, sized by what runs, within a byte budget.

    keys, values: (layers, rows, kv_heads, length, head_dim)

Running sequence i owns row i. When a sequence finishes, the last running sequence moves into its row
(one copy of its written positions), so the running batch is always rows [0, n) and attention reads a
plain slice of the cache, never a gathered copy.

Nothing is preallocated: the tensors grow (rows and length each at least doubling, zero-filled, the
written positions copied over) when a step needs more than they hold, and are freed when nothing runs.
Admission keeps the rows within `budget` bytes (`fits`), counting each sequence at its longest (prompt +
max_new_tokens); what the rows leave of the budget is the prefix store's (`prefix_cache.py`), whose
blocks are copied into a row when a sequence is admitted and out of it once written. This is a
block-granular prefix store in front of contiguous rows, not paged attention: attention never reads a
block in place.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, budget: int):
        self.rows, self.max_len, self.budget = rows, max_len, budget  # rows: the most running sequences
        self._shape = (num_layers, kv_heads, head_dim)
        self.device, self.dtype = device, dtype
        self.position_bytes = 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self.keys = self.values = torch.zeros(self._dims(0, 0), device=device, dtype=dtype)

    def _dims(self, rows: int, length: int) -> tuple[int, ...]:
        layers, kv_heads, head_dim = self._shape
        return layers, rows, kv_heads, length, head_dim

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, positions) the tensors hold now."""
        return self.keys.shape[1], self.keys.shape[3]

    @property
    def num_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def bytes_for(self, rows: int, length: int) -> int:
        return rows * length * self.position_bytes

    def fits(self, rows: int, length: int) -> bool:
        """Whether `rows` running sequences of up to `length` positions stay within the budget."""
        return self.bytes_for(rows, length) <= self.budget

    def reserve(self, rows: int, length: int) -> None:
        """Hold at least `rows` rows of `length` positions, keeping what is written; growth doubles while the
        budget allows, so a long generation copies its row O(log length) times."""
        have_rows, have_len = self.capacity
        if rows <= have_rows and length <= have_len:
            return
        new_rows = max(rows, min(self.rows, 2 * have_rows)) if rows > have_rows else have_rows
        new_len = max(length, 2 * have_len) if length > have_len else have_len
        while new_len > length and not self.fits(new_rows, new_len):
            new_len = max(length, new_len * 3 // 4)
        while new_rows > rows and not self.fits(new_rows, new_len):
            new_rows -= 1
        keys = torch.zeros(self._dims(new_rows, new_len), device=self.device, dtype=self.dtype)
        values = torch.zeros_like(keys)
        keys[:, :have_rows, :, :have_len] = self.keys
        values[:, :have_rows, :, :have_len] = self.values
        self.keys, self.values = keys, values

    def release(self) -> None:
        """Free the rows (nothing runs); the next step allocates what it needs."""
        self.keys = self.values = torch.zeros(self._dims(0, 0), device=self.device, dtype=self.dtype)

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              valid: torch.Tensor | None = None) -> None:
        """Store k, v (n, kv_heads, T, head_dim) of rows (n,) at positions (n, T); `valid` (n, T) bool: only
        those tokens (the rest is padding, written nowhere)."""
        if valid is None:
            index = (rows[:, None], slice(None), positions)
            self.keys[layer][index] = k.transpose(1, 2)  # indexed view is (n, T, kv_heads, head_dim)
            self.values[layer][index] = v.transpose(1, 2)
            return
        row, token = valid.nonzero(as_tuple=True)
        index = (rows[row], slice(None), positions[row, token])        # indexed view is (N, kv_heads, head_dim)
        self.keys[layer][index] = k[row, :, token]
        self.values[layer][index] = v[row, :, token]

    def read(self, layer: int, first_row: int, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows [first_row, first_row + count), positions [0, length): views, no copy."""
        rows = slice(first_row, first_row + count)
        return self.keys[layer, rows, :, :length], self.values[layer, rows, :, :length]

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of row `source` into row `target` (all layers)."""
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]

    def copy_out(self, row: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (layers, kv_heads, end - start, head_dim) of positions [start, end) of `row`, copied."""
        return self.keys[:, row, :, start:end].clone(), self.values[:, row, :, start:end].clone()

    def copy_in(self, row: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write keys and values (layers, kv_heads, n, head_dim) at positions [start, start + n) of `row`."""
        end = start + keys.shape[2]
        self.keys[:, row, :, start:end] = keys
        self.values[:, row, :, start:end] = values
