"""Continuous batching: which sequences run at each step, and one step of the engine.

A step (runs on the engine thread only):
  1. cancelled sequences leave (their cache row and adapter pin are freed before any compute);
  2. waiting sequences are admitted in arrival order while cache rows are free and the prefill token
     budget lasts; a sequence whose adapter cannot get a slot (every slot pinned by running sequences)
     stays waiting without blocking those behind it whose adapters are resident or loadable;
  3. the admitted prompts are prefilled together, right-padded, and each samples its first token;
  4. every running sequence decodes one token in a single forward pass, whatever its adapter.
Finished sequences leave after 3 and 4, so new ones join and finished ones leave between decode steps.

Fast paths: a batch in which no row has an adapter runs the bare base weights (no LoRA work at all);
rows without an adapter in a mixed batch are left out of the LoRA products; the per-batch LoRA state (on
the batched-products path, the gathered factors) is reused until the batch's composition changes; and
with `auto_merge`, a decode batch whose rows all use one adapter for MERGE_AFTER_STEPS steps in a row
runs on weights with that adapter merged in (`W + s·BA`, built once per adapter and kept until another
adapter needs merging), so a short run of one-adapter batches does not pay for a merge it cannot amortise.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import torch

from lorakit.engine.adapter_cache import AdapterCache, NoFreeSlot
from lorakit.engine.kv_cache import KVCache
from lorakit.engine.lora_slots import LoraBatch, LoraSlots
from lorakit.engine.runner import DecoderRunner, Weights
from lorakit.engine.sampling import choose_next_tokens
from lorakit.engine.sequence import Sequence
from lorakit.errors import LorakitError

MERGE_AFTER_STEPS = 4


class Scheduler:
    def __init__(self, runner: DecoderRunner, kv: KVCache, slots: LoraSlots, adapters: AdapterCache,
                 eos_ids: frozenset[int], prefill_token_budget: int = 4096, auto_merge: bool = False):
        self.runner, self.kv, self.slots, self.adapters = runner, kv, slots, adapters
        self.eos_ids, self.prefill_token_budget, self.auto_merge = eos_ids, prefill_token_budget, auto_merge
        self.device = kv.keys.device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._batch_lora: tuple[Optional[tuple], Optional[LoraBatch]] = (None, None)
        self._merged: tuple[Optional[tuple], Optional[Weights]] = (None, None)
        self._single_streak: tuple[int, int] = (-1, 0)  # (slot, decode steps in a row with only that adapter)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> int:
        """One scheduling step; returns the number of tokens generated."""
        self._drop_cancelled()
        admitted = self._admit()
        generated = 0
        if admitted:
            first_row = len(self.running)
            self.running.extend(admitted)
            generated += self._prefill(admitted, first_row)
            self._remove_finished()
        if self.running:
            generated += self._decode()
            self._remove_finished()
        return generated

    def abort_all(self, reason: str = "abort", error: Optional[str] = None) -> None:
        """End every waiting and running sequence (engine stop, or an engine fault)."""
        for seq in list(self.waiting) + self.running:
            seq.end(reason, error)
        self.waiting.clear()
        for seq in self.running:
            self._release(seq)
        self.running.clear()

    # --- admission -----------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.waiting if s.handle.cancelled]:
            self.waiting.remove(seq)
            seq.end("abort")
        for seq in self.running:
            if seq.handle.cancelled and seq.finish_reason is None:
                seq.end("abort")
        self._remove_finished()

    def _admit(self) -> list[Sequence]:
        admitted, tokens = [], 0
        for seq in list(self.waiting):
            if len(self.running) + len(admitted) >= self.kv.rows:
                break
            if admitted and tokens + len(seq.prompt_ids) > self.prefill_token_budget:
                break
            if seq.adapter is not None:
                try:
                    seq.slot = self.adapters.acquire(seq.adapter)
                except NoFreeSlot:
                    continue
                except LorakitError as exc:  # its files vanished or changed since it was registered
                    self.waiting.remove(seq)
                    seq.end("error", str(exc))
                    continue
            self.waiting.remove(seq)
            admitted.append(seq)
            tokens += len(seq.prompt_ids)
        return admitted

    # --- compute -------------------------------------------------------------------------------------
    def _prefill(self, batch: list[Sequence], first_row: int) -> int:
        longest = max(len(s.prompt_ids) for s in batch)
        tokens = torch.zeros(len(batch), longest, dtype=torch.long)
        for i, seq in enumerate(batch):
            tokens[i, :len(seq.prompt_ids)] = torch.tensor(seq.prompt_ids)
        positions = torch.arange(longest).expand(len(batch), longest)
        last = torch.tensor([len(s.prompt_ids) - 1 for s in batch])
        lora = self.slots.batch([s.slot for s in batch])
        logits = self.runner.forward(tokens.to(self.device), positions.to(self.device), first_row,
                                     last.to(self.device), lora)
        return self._accept(batch, logits)

    def _decode(self) -> int:
        batch = self.running
        tokens = torch.tensor([[s.output_ids[-1]] for s in batch], device=self.device)
        positions = torch.tensor([[s.length - 1] for s in batch], device=self.device)
        last = torch.zeros(len(batch), dtype=torch.long, device=self.device)
        lora, weights = self._adapters_for([s.slot for s in batch])
        logits = self.runner.forward(tokens, positions, 0, last, lora, weights)
        return self._accept(batch, logits)

    def _adapters_for(self, row_slots: list[int]) -> tuple[Optional[LoraBatch], Optional[Weights]]:
        """This composition's LoRA (cached), or merged weights for a one-adapter batch."""
        key = (tuple(row_slots), self.slots.version)
        if self._batch_lora[0] != key:
            self._batch_lora = (key, self.slots.batch(row_slots))
        lora = self._batch_lora[1]
        single = row_slots[0] if lora is not None and len(set(row_slots)) == 1 else -1
        streak = self._single_streak[1] + 1 if single == self._single_streak[0] else 1
        self._single_streak = (single, streak)
        if self.auto_merge and single >= 0 and streak >= MERGE_AFTER_STEPS:
            merge_key = (single, self.slots.version)
            if self._merged[0] != merge_key:
                self._merged = (None, None)  # free the previous merged copy before building the next
                self._merged = (merge_key, self.runner.merged_weights(self.slots.delta(single)))
            return None, self._merged[1]
        return lora, None

    def _accept(self, batch: list[Sequence], logits: torch.Tensor) -> int:
        tokens = choose_next_tokens(logits, [s.params for s in batch], [s.generator for s in batch])
        for seq, token in zip(batch, tokens):
            seq.accept(token, self.eos_ids)
        return len(batch)

    # --- leaving -------------------------------------------------------------------------------------
    def _remove_finished(self) -> None:
        """Drop finished sequences, moving the last running row into each hole to keep rows contiguous."""
        for i in reversed(range(len(self.running))):
            seq = self.running[i]
            if seq.finish_reason is None:
                continue
            self._release(seq)
            last = len(self.running) - 1
            if i != last:
                self.kv.move_row(last, i, self.running[last].length)
                self.running[i] = self.running[last]
            self.running.pop()

    def _release(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self.adapters.release(seq.slot)
            seq.slot = -1
