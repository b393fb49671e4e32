"""A preallocated key/value cache whose rows are the running sequences, kept contiguous.

    keys, values: (layers, rows, kv_heads, max_len, head_dim)

Running sequence i owns row i. When a sequence finishes, the last running sequence moves into its row
(one copy of its filled positions), so the running batch is always rows [0, n) and attention reads a
plain slice of the cache, never a gathered copy. Memory is fixed when the engine starts: nothing grows
with traffic.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (num_layers, rows, kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.rows, self.max_len = rows, max_len

    @property
    def num_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (n, kv_heads, T, head_dim) of rows (n,) at positions (n, T)."""
        index = (rows[:, None], slice(None), positions)
        self.keys[layer][index] = k.transpose(1, 2)  # indexed view is (n, T, kv_heads, head_dim)
        self.values[layer][index] = v.transpose(1, 2)

    def read(self, layer: int, first_row: int, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows [first_row, first_row + count), positions [0, length): views, no copy."""
        rows = slice(first_row, first_row + count)
        return self.keys[layer, rows, :, :length], self.values[layer, rows, :, :length]

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of row `source` into row `target` (all layers)."""
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]
