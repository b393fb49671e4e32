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

A stored block is a block of the paged cache (`kv_cache.py`) the cache knows by its hash. A lookup takes
the longest run of leading blocks present, short of the prompt's last token (whose logits the prefill
must compute), and puts them at the start of the sequence's block table: shared in place, nothing
copied, each holder counted. A sequence's full blocks are registered once written (after its prefill,
and again when it finishes, generated tokens included, so the next turn of a chat finds the whole
previous turn); a block computed twice at once (two requests with the same new prefix) is kept once.
Blocks no table holds stay cached, least recently used first out, until a new block needs their memory.
With `enabled` False nothing is looked up or registered: the engine's reference path, tested to give
the same tokens.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass


from lorakit.engine.kv_cache import KVCache
from lorakit.engine.sequence import Sequence

DEFAULT_BLOCK_SIZE = 16


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
    def __init__(self, kv: KVCache, shared_across_tenants: bool = False, enabled: bool = True):
        self.kv, self.block_size, self.enabled = kv, kv.block_size, enabled
        self.shared_across_tenants = shared_across_tenants
        self.blocks: OrderedDict[bytes, int] = OrderedDict()  # hash -> block, least recently used first
        self.by_block: dict[int, bytes] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()     # known blocks no table holds, LRU first
        self.stats = PrefixStats()
        kv.reclaim, kv.on_unreferenced, kv.evictable = self._reclaim, self._on_unreferenced, lambda: len(self.idle)

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
        """Put the stored blocks `seq`'s prompt starts with at the start of its block table (held: `release`)."""
        self.stats.prompt_tokens += len(seq.prompt_ids)
        seq.cached = 0
        if not self.enabled:
            return
        for key in self.hashes(seq, (len(seq.prompt_ids) - 1) // self.block_size):
            block = self.blocks.get(key)
            if block is None:
                break
            self.blocks.move_to_end(key)
            self._hold(block)
            seq.block_table.append(block)
        seq.registered = len(seq.block_table)
        seq.cached = seq.registered * self.block_size
        self.stats.hit_tokens += seq.cached

    def unlookup(self, seq: Sequence) -> None:
        """Undo `lookup` for a sequence that was not admitted after all."""
        self.stats.prompt_tokens -= len(seq.prompt_ids)
        self.stats.hit_tokens -= seq.cached
        self.kv.release(seq.block_table)
        seq.cached = seq.registered = 0

    def register(self, seq: Sequence, written: int) -> None:
        """Make the full blocks of `seq`'s first `written` positions findable; a block whose contents the cache
        already holds under another id is swapped for that one (the duplicate goes free)."""
        if not self.enabled:
            return
        size, table = self.block_size, seq.block_table
        for j, key in enumerate(self.hashes(seq, written // size)):
            if j < seq.registered:
                continue
            known = self.blocks.get(key)
            if known is None:
                self.blocks[key] = table[j]
                self.by_block[table[j]] = key
                self.stats.cached_blocks += 1
            elif known != table[j]:
                self._hold(known)
                self.kv.unref(table[j])
                table[j] = known
            self.blocks.move_to_end(key)
        seq.registered = max(seq.registered, written // size)
        self.stats.cached_bytes = self.stats.cached_blocks * self.kv.block_bytes

    def _hold(self, block: int) -> None:
        self.idle.pop(block, None)
        self.kv.ref(block)

    # --- the pool's side: blocks no table holds --------------------------------------------------------
    def _on_unreferenced(self, block: int) -> bool:
        """A block the last table let go of: kept (idle, evictable) if the cache knows it."""
        if block in self.by_block:
            self.idle[block] = None
            return True
        return False

    def _reclaim(self):
        """Evict the least recently used idle block; its id, or None if there is none."""
        if not self.idle:
            return None
        block, _ = self.idle.popitem(last=False)
        del self.blocks[self.by_block.pop(block)]
        self.stats.cached_blocks -= 1
        self.stats.cached_bytes = self.stats.cached_blocks * self.kv.block_bytes
        self.stats.evicted_blocks += 1
        return block

    def clear(self) -> None:
        """Forget every idle block (they go free); blocks tables hold stay, unknown to the cache."""
        while (block := self._reclaim()) is not None:
            self.kv.give_back(block)
