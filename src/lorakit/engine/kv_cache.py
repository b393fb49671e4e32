"""The keys and values of every sequence, paged: fixed-size blocks in one pool, found through block tables.

    keys, values: (layers, blocks, kv_heads, block_size, head_dim)

A sequence holds a block table, the list of its blocks in position order: position p lives at offset
p % block_size of block table[p // block_size]. Blocks are reference-counted: a block the prefix cache
knows (`prefix_cache.py`) can be in several tables at once (requests that start alike share it, nothing
copied), and one no table holds stays cached until a new block needs its memory. Only full blocks are
shared, and a full block is never written again, so sharing needs no copy-on-write.

The pool is sized by the KV budget alone (`budget // block_bytes` blocks), never by max_running ×
max_model_len. On a CPU the tensors are reserved, not filled: the OS commits a page when a block on it is
first written, and the lowest free block is always taken first, so an idle server that has run little
holds little, and what it holds stays packed at the start of the pool.

Attention reads the blocks where they lie (`paged_attention.py`).
"""

from __future__ import annotations

import heapq
from typing import Callable, Optional

import torch


class OutOfBlocks(RuntimeError):
    """The pool has no free block and nothing cached to evict (admission keeps this from happening)."""


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, budget: int, max_len: int, max_running: int):
        self.block_size, self.max_len, self.rows = block_size, max_len, max_running  # rows: the most running
        self.device, self.dtype, self.budget = device, dtype, budget
        self.position_bytes = 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self.block_bytes = self.position_bytes * block_size
        self.num_blocks = budget // self.block_bytes
        shape = (num_layers, self.num_blocks, kv_heads, block_size, head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.refs = [0] * self.num_blocks
        self._free = list(range(self.num_blocks))  # a heap: the lowest free block first
        self._zeroed = 0  # blocks [0, _zeroed) have been written or zeroed: never uninitialised memory
        self.reclaim: Callable[[], Optional[int]] = lambda: None  # set by the prefix cache: evict one, its id
        self.evictable: Callable[[], int] = lambda: 0             # how many blocks `reclaim` could give back
        self.on_unreferenced: Callable[[int], bool] = lambda block: False  # True: the cache keeps it

    # --- sizes ---------------------------------------------------------------------------------------
    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def bytes_for(self, rows: int, length: int) -> int:
        return rows * self.blocks_for(length) * self.block_bytes

    @property
    def free_blocks(self) -> int:
        """Blocks a new sequence could take now: never used or released, or cached and held by no table."""
        return len(self._free) + self.evictable()

    @property
    def used_blocks(self) -> int:
        """Blocks some table holds."""
        return sum(1 for r in self.refs if r)

    # --- blocks --------------------------------------------------------------------------------------
    def allocate(self) -> int:
        """A block for a table to write (its reference taken)."""
        if self._free:
            block = heapq.heappop(self._free)
            if block >= self._zeroed:  # first use: zeroed, so a masked read (0 x NaN) never meets garbage
                self.keys[:, self._zeroed:block + 1].zero_()
                self.values[:, self._zeroed:block + 1].zero_()
                self._zeroed = block + 1
        else:
            block = self.reclaim()
            if block is None:
                raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        self.refs[block] = 1
        return block

    def ref(self, block: int) -> None:
        self.refs[block] += 1

    def unref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0 and not self.on_unreferenced(block):
            heapq.heappush(self._free, block)

    def give_back(self, block: int) -> None:
        """A cached block no table holds, evicted: free again."""
        heapq.heappush(self._free, block)

    def extend(self, table: list[int], positions: int) -> None:
        """Grow `table` to hold `positions` positions."""
        while len(table) < self.blocks_for(positions):
            table.append(self.allocate())

    def release(self, table: list[int]) -> None:
        for block in table:
            self.unref(block)
        table.clear()

    # --- reading and writing -------------------------------------------------------------------------
    def slots(self, tables: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) of each position (n, T) of the rows whose block tables are `tables` (n, max_blocks)."""
        blocks = torch.gather(tables, 1, positions // self.block_size)
        return blocks, positions % self.block_size

    def write(self, layer: int, blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              valid: Optional[torch.Tensor] = None) -> None:
        """Store k, v (n, kv_heads, T, head_dim) at their (block, offset) (n, T); `valid` (n, T) bool: only those
        tokens (the rest is padding, written nowhere)."""
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (n, T, kv_heads, head_dim)
        if valid is not None:
            blocks, offsets, k, v = blocks[valid], offsets[valid], k[valid], v[valid]
        index = (blocks.reshape(-1), slice(None), offsets.reshape(-1))  # indexed view: (N, kv_heads, head_dim)
        self.keys[layer][index] = k.reshape(-1, *k.shape[-2:])
        self.values[layer][index] = v.reshape(-1, *v.shape[-2:])

    def gather(self, layer: int, tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (n, kv_heads, length, head_dim) of positions [0, length) of each row, copied out of
        its blocks (positions past a row's own length hold whatever its table's padding points at)."""
        count = self.blocks_for(length)
        index = tables[:, :count]
        n, heads, size, dim = index.shape[0], self.keys.shape[2], self.block_size, self.keys.shape[4]

        def rows(pool: torch.Tensor) -> torch.Tensor:
            picked = pool[layer][index]  # (n, count, kv_heads, block_size, head_dim)
            return picked.transpose(1, 2).reshape(n, heads, count * size, dim)[:, :, :length]
        return rows(self.keys), rows(self.values)
