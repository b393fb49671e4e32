"""One request inside the engine: its prompt, settings, adapters and their pins, generated tokens and text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from lorakit.engine.adapter_cache import AdapterInfo
from lorakit.engine.mixture import RowPairs
from lorakit.engine.requests import RequestHandle, TokenEvent
from lorakit.engine.sampling import SamplingParams
from lorakit.engine.text import IncrementalText


@dataclass
class Sequence:
    handle: RequestHandle
    prompt_ids: list[int]
    params: SamplingParams
    adapters: tuple[tuple[AdapterInfo, float], ...]  # (): the base; one at weight 1; or a mixture's (mixture.py)
    text: IncrementalText
    max_new_tokens: int
    generator: Optional[torch.Generator] = None
    slots: tuple[int, ...] = ()     # the adapters' slots (pinned) while running
    output_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    tenant: Optional[str] = None    # who sent it; its sequences running at once stay <= tenant_max_running
    tenant_max_running: Optional[int] = None
    activation: Optional[int] = None  # an activated LoRA's invocation start: positions before it are the base's
    cached: int = 0                 # prompt positions taken from the prefix cache (prefix_cache.py)
    block_table: list[int] = field(default_factory=list)  # its blocks of the paged cache, in position order
    registered: int = 0             # leading blocks the prefix cache knows
    block_hashes: list[bytes] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Tokens in the cache once the last generated token has been fed back."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def longest(self) -> int:
        """Positions it may hold at most (prompt + max_new_tokens)."""
        return len(self.prompt_ids) + self.max_new_tokens

    @property
    def row_pairs(self) -> RowPairs:
        """(slot, weight) of each adapter while running: what its batch row adds (lora_slots.py)."""
        return tuple((slot, weight) for slot, (_, weight) in zip(self.slots, self.adapters))

    @property
    def base_prefix(self) -> int:
        """Prompt positions the base model computes: those before an activated LoRA's invocation, else none."""
        return self.activation or 0

    def producer(self, end: int) -> Optional[tuple]:
        """What computes the keys and values of a block ending at position `end`: None for the base model, else
        the adapters' (digest, weight) pairs and, for an activated LoRA, where its invocation starts."""
        if not self.adapters or (self.activation is not None and end <= self.activation):
            return None
        return tuple((info.digest, weight) for info, weight in self.adapters), self.activation

    def accept(self, token: int, eos_ids: frozenset[int]) -> None:
        """Record a generated token, push its text to the caller, and decide whether the sequence is done."""
        self.output_ids.append(token)
        if token in eos_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
            delta = self.text.finish()
        else:
            delta = self.text.add(token)
            if self.text.stopped:
                self.finish_reason = "stop"
            elif len(self.output_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
                delta += self.text.finish()
        self.handle.push(TokenEvent([token], delta, self.finish_reason, len(self.prompt_ids),
                                    len(self.output_ids)))

    def end(self, reason: str, error: Optional[str] = None, internal: bool = False) -> None:
        """Finish without a new token (cancelled, timed out, failed; `internal`: the server's fault)."""
        self.finish_reason = reason
        self.handle.push(TokenEvent([], "", reason, len(self.prompt_ids), len(self.output_ids), error, internal))
