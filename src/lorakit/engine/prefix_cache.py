"""The prefix cache: blocks of keys and values that later requests with the same beginning reuse.

A sequence's positions are cut into blocks of `block_size` tokens. Block j is known by the hash

    h_j = H(h_{j-1}, namespace, producer_j, tokens[j·B : (j+1)·B])          (h_{-1}: empty)

which covers everything that decides its keys and values: every token up to the block's end (through
the chain), what computed it (producer: None for the base model; the adapters' content digests and
weights otherwise; for an activated LoRA, None for the blocks that end at or before its invocation, which
are the base model's exactly, and its digest and invocation start for the rest), and the namespace: the
request's tenant, unless the operator shares the cache across tenants (a hit is observable in timing).
Adapters are known by content digest, so an adapter replaced under the same name never hits the blocks
of the one it replaced.

Stored blocks are kept in least-recently-used order within what the running rows leave of the KV budget
(`KVCache`). A lookup takes the longest run of leading blocks present, short of the prompt's last token
(whose logits the prefill must compute). Blocks are copied into a sequence's row when it starts and out of
it once written (after its prefill, and again when it finishes, generated tokens included, so the next
turn of a chat finds the whole previous turn), so no running sequence references a stored block and
any block can be evicted at any time. With `enabled` False nothing is looked up or stored: the engine's
reference path, tested to give the same tokens.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from lorakit.engine.kv_cache import KVCache
from lorakit.engine.sequence import Sequence

DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class Block:
    keys: torch.Tensor    # (layers, kv_heads, block_size, head_dim)
    values: torch.Tensor

    @property
    def num_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


@dataclass
class PrefixStats:
    """Prompt tokens looked up and found, and what the cache holds now."""

    prompt_tokens: int = 0
    hit_tokens: int = 0
    cached_blocks: int = 0
    cached_bytes: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def chain(parent: bytes, namespace, producer, tokens: list[int]) -> bytes:
    """The hash of a block after `parent`'s (see the module docstring)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(repr((namespace, producer, tuple(tokens))).encode())
    return h.digest()


class PrefixCache:
    def __init__(self, kv: KVCache, block_size: int = DEFAULT_BLOCK_SIZE, shared_across_tenants: bool = False,
                 enabled: bool = True):
        self.kv, self.block_size, self.enabled = kv, block_size, enabled
        self.shared_across_tenants = shared_across_tenants
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()
        self.stats = PrefixStats()

    def hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """The hashes of `seq`'s first `count` blocks (prompt, then generated tokens), computed once each."""
        size, ids = self.block_size, seq.prompt_ids + seq.output_ids
        namespace = None if self.shared_across_tenants else seq.tenant
        while len(seq.block_hashes) < count:
            j = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if j else b""
            tokens = ids[j * size:(j + 1) * size]
            seq.block_hashes.append(chain(parent, namespace, seq.producer((j + 1) * size), tokens))
        return seq.block_hashes[:count]

    def lookup(self, seq: Sequence) -> None:
        """Find the stored blocks `seq`'s prompt starts with; they are copied into its row by `load`."""
        self.stats.prompt_tokens += len(seq.prompt_ids)
        if not self.enabled:
            return
        found = []
        for key in self.hashes(seq, (len(seq.prompt_ids) - 1) // self.block_size):
            block = self.blocks.get(key)
            if block is None:
                break
            self.blocks.move_to_end(key)
            found.append(block)
        seq.cached_blocks, seq.cached = found, len(found) * self.block_size
        self.stats.hit_tokens += seq.cached

    def load(self, seq: Sequence, row: int) -> None:
        """Copy the blocks `lookup` found into `row`."""
        if seq.cached_blocks:
            self.kv.copy_in(row, 0, torch.cat([b.keys for b in seq.cached_blocks], 2),
                            torch.cat([b.values for b in seq.cached_blocks], 2))

    def save(self, seq: Sequence, row: int, written: int) -> None:
        """Store the full blocks of `row`'s first `written` positions that the cache does not hold yet."""
        if not self.enabled:
            return
        size = self.block_size
        for j, key in enumerate(self.hashes(seq, written // size)):
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            block = Block(*self.kv.copy_out(row, j * size, (j + 1) * size))
            self.blocks[key] = block
            self.stats.cached_blocks += 1
            self.stats.cached_bytes += block.num_bytes
        self.fit()

    def fit(self) -> None:
        """Evict least recently used blocks until the store fits in what the running rows leave of the budget."""
        limit = self.kv.budget - self.kv.num_bytes
        while self.blocks and self.stats.cached_bytes > limit:
            _, block = self.blocks.popitem(last=False)
            self.stats.cached_blocks -= 1
            self.stats.cached_bytes -= block.num_bytes
            self.stats.evicted_blocks += 1
