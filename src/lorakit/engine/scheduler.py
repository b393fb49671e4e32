"""Continuous batching: which sequences run at each step, and one step of the engine.

A step (runs on the engine thread only):
  1. cancelled sequences leave (their cache row and adapter pin are freed before any compute), and so
     do waiting ones whose adapter was unloaded or replaced meanwhile (they end "unloaded");
  2. the switching policy (`switching.py`) chooses whether one adapter's requests are admitted alone,
     to run on merged weights;
  3. waiting sequences are admitted in arrival order while cache rows are free, the KV budget holds
     them at their longest and the prefill token budget lasts; each finds the leading blocks of its
     prompt that the prefix cache holds (`prefix_cache.py`); a sequence whose adapter (or one of its
     mixture's) cannot get a slot (every slot pinned
     by running sequences), whose tenant already has its `max_running` sequences running, or that the
     switching policy holds back, stays waiting without blocking those behind it;
  4. the admitted prompts are prefilled together from where their cached blocks end, right-padded, and
     each samples its first token; an activated LoRA's positions before its invocation run first, as the
     base model alone (no LoRA work, and base blocks for the cache), the rest with the adapter; the
     written blocks go to the prefix cache;
  5. every running sequence decodes one token in a single forward pass, whatever its adapter or mixture
     (on merged weights when every row is on the adapter the policy merged).
Finished sequences leave after 4 and 5 (their blocks, generated tokens included, go to the prefix
cache), so new ones join and finished ones leave between decode steps.

A failure belongs to its request. An adapter that cannot be put into a slot ends that sequence with an
error at admission. A forward pass that raises is run again one sequence at a time (the KV cache
positions it writes are the same, so repeating them is harmless), and only the sequences that fail
alone end with the error. A row whose logits are not finite (an adapter whose weights overflow) ends with
an error, and so does a row whose sampling or detokenizing raises; the rest of the batch goes on.

Fast paths: a batch in which no row has an adapter runs the bare base weights (no LoRA work at all);
rows without an adapter in a mixed batch are left out of the LoRA products; the per-batch LoRA state (on
the batched-products path, the gathered factors) is reused until the batch's composition changes; and
a batch on the adapter (or mixture) that the switching policy merged runs on `W + s·BA` with no LoRA work.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from typing import Callable, Optional

import torch

from lorakit.engine.adapter_cache import AdapterCache, NoFreeSlot
from lorakit.engine.kv_cache import KVCache
from lorakit.engine.lora_slots import LoraBatch, LoraSlots
from lorakit.engine.mixture import RowPairs
from lorakit.engine.prefix_cache import PrefixCache
from lorakit.engine.runner import DecoderRunner
from lorakit.engine.sampling import choose_next_tokens
from lorakit.engine.sequence import Sequence
from lorakit.engine.switching import Switching
from lorakit.errors import AdapterError, AdapterUnloadedError, LorakitError, RequestError

NON_FINITE = ("the model produced non-finite logits for this request (NaN or infinity: its adapter's weights "
              "overflow at this scale); the request was stopped")
log = logging.getLogger("lorakit.engine")


def _failure(exc: BaseException) -> str:
    """The message a request that failed on `exc` ends with."""
    if isinstance(exc, LorakitError):
        return str(exc)
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return "out of memory while running this request; retry it, or send a shorter one"
    return f"internal error while running this request ({type(exc).__name__})"


class Scheduler:
    def __init__(self, runner: DecoderRunner, kv: KVCache, slots: LoraSlots, adapters: AdapterCache,
                 eos_ids: frozenset[int], prefill_token_budget: int = 4096, switching: Optional[Switching] = None,
                 prefix: Optional[PrefixCache] = None):
        self.runner, self.kv, self.slots, self.adapters = runner, kv, slots, adapters
        self.prefix = prefix or PrefixCache(kv, enabled=False)
        self.eos_ids, self.prefill_token_budget = eos_ids, prefill_token_budget
        self.switching = switching or Switching("off", runner, slots, adapters.is_current, kv.rows)
        self.device = kv.keys.device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._batch_lora: tuple[Optional[tuple], Optional[LoraBatch]] = (None, None)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> int:
        """One scheduling step; returns the number of tokens generated."""
        self._drop_cancelled()
        self.switching.plan(self.waiting, self.running)
        admitted = self._admit()
        generated = 0
        if admitted:
            self.running.extend(admitted)
            generated += self._isolated(admitted, lambda: self._prefill(admitted), lambda i: self._prefill([admitted[i]]))
            self._remove_finished()
        if self.running:
            running = list(self.running)
            generated += self._isolated(running, lambda: self._decode(running), lambda i: self._decode([running[i]]))
            self._remove_finished()
        return generated

    def _isolated(self, batch: list[Sequence], whole: Callable[[], int], alone: Callable[[int], int]) -> int:
        """Run `whole`; if it raises, run each sequence `alone` and end those that still fail."""
        try:
            return whole()
        except Exception as exc:
            if len(batch) == 1:
                self._fail(batch[0], exc)
                return 0
        generated = 0
        for i, seq in enumerate(batch):
            try:
                generated += alone(i)
            except Exception as exc:
                self._fail(seq, exc)
        return generated

    @staticmethod
    def _fail(seq: Sequence, exc: BaseException) -> None:
        if not isinstance(exc, LorakitError):
            log.warning("request %s failed: %s: %s", seq.handle.id, type(exc).__name__, exc)
        seq.end("unloaded" if isinstance(exc, AdapterUnloadedError) else "error", _failure(exc),
                internal=not isinstance(exc, LorakitError))

    def abort_all(self, reason: str = "abort", error: Optional[str] = None) -> None:
        """End every waiting and running sequence (engine stop, or an engine fault)."""
        for seq in list(self.waiting) + self.running:
            seq.end(reason, error, internal=reason == "error")
        self.waiting.clear()
        for seq in self.running:
            self._release(seq)
        self.running.clear()

    # --- admission -----------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.waiting if s.handle.cancelled]:
            self.waiting.remove(seq)
            seq.end("abort")
        # Waiting for an adapter that was unloaded or replaced: fail now, not when a row frees up.
        for seq in list(self.waiting):
            stale = [info.name for info, _ in seq.adapters if not self.adapters.is_current(info)]
            if stale:
                self.waiting.remove(seq)
                self._fail(seq, AdapterUnloadedError(stale[0]))
        for seq in self.running:
            if seq.handle.cancelled and seq.finish_reason is None:
                seq.end("abort")
        self._remove_finished()

    def _admit(self) -> list[Sequence]:
        """The waiting sequences that start now. Each is admitted only with blocks for its longest (prompt +
        max_new_tokens) set aside beside what the running ones may still take, so no running sequence is
        ever short of a block."""
        admitted, tokens = [], 0
        kv = self.kv
        outstanding = sum(kv.blocks_for(s.longest) - len(s.block_table) for s in self.running)
        per_tenant = Counter(s.tenant for s in self.running)
        for seq in list(self.waiting):
            if len(self.running) + len(admitted) >= self.kv.rows:
                break
            if seq.tenant_max_running is not None and per_tenant[seq.tenant] >= seq.tenant_max_running:
                continue  # its tenant has its share running; other tenants' requests behind it go ahead
            if not self.switching.admits(seq):
                continue  # another adapter runs merged; this one waits, within the policy's bound
            if admitted and tokens + len(seq.prompt_ids) > self.prefill_token_budget:
                break
            if kv.blocks_for(seq.longest) > kv.num_blocks:
                self.waiting.remove(seq)
                self._fail(seq, RequestError(
                    "this request's prompt and max_tokens need more KV memory than the server has; send fewer "
                    "tokens, or raise --kv-cache-memory"))
                continue
            self.prefix.lookup(seq)  # holds its cached blocks, which may have been idle: count after
            need = kv.blocks_for(seq.longest) - len(seq.block_table)
            if outstanding + need > kv.free_blocks:
                self.prefix.unlookup(seq)
                break  # the blocks are spoken for; it waits for running sequences to finish
            if seq.adapters:
                try:
                    seq.slots = self._acquire(seq)
                except NoFreeSlot:
                    self.prefix.unlookup(seq)
                    if not self.running and not admitted:  # its own adapters fill every slot there can be
                        self.waiting.remove(seq)
                        self._fail(seq, AdapterError(
                            f"this mixture needs {len(seq.adapters)} adapters resident at once and the server holds "
                            f"at most {self.slots.num_slots}; mix fewer, or raise --max-loaded-adapters or "
                            "--adapter-memory"))
                    continue
                except Exception as exc:  # unloaded or replaced meanwhile, no memory for its slot, ...
                    self.prefix.unlookup(seq)
                    self.waiting.remove(seq)
                    self._fail(seq, exc)
                    continue
            self.waiting.remove(seq)
            admitted.append(seq)
            per_tenant[seq.tenant] += 1
            tokens += len(seq.prompt_ids)
            outstanding += need
        return admitted

    def _tables(self, batch: list[Sequence], lengths: list[int]) -> torch.Tensor:
        """The rows' block tables (n, max_blocks), each grown first to hold its length (padding: block 0)."""
        for seq, length in zip(batch, lengths):
            self.kv.extend(seq.block_table, length)
        width = max(len(s.block_table) for s in batch)
        return torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in batch], device=self.device)

    # --- compute -------------------------------------------------------------------------------------
    def _prefill(self, batch: list[Sequence]) -> int:
        """Prefill each row's uncached prompt positions. An activated LoRA's positions before its invocation
        are the base model's, with no LoRA work: in the same pass as the rest when the compiled kernel runs
        the LoRA (it skips those tokens), else in a base pass of their own first (the batched products and
        merged weights cannot leave tokens out)."""
        base = [s for s in batch if s.base_prefix > s.cached]
        one_pass = not base or (self.slots.kernel is not None and self.switching.weights(batch, build=False) is None)
        if not one_pass:
            ends = [s.base_prefix for s in base]
            tokens, positions, last, valid = self._span(base, [s.cached for s in base], ends)
            self.runner.forward(tokens, positions, self._tables(base, ends), last, valid=valid)
        ends = [len(s.prompt_ids) for s in batch]
        starts = [s.cached if one_pass else max(s.cached, s.base_prefix) for s in batch]
        tokens, positions, last, valid = self._span(batch, starts, ends)
        active = None
        if base and one_pass:  # the adapters act from each row's invocation on
            active = positions >= torch.tensor([s.base_prefix for s in batch], device=self.device)[:, None]
        generated = self._forward(batch, tokens, positions, self._tables(batch, ends), last, decode=False,
                                  valid=valid, active=active)
        for seq in batch:
            if seq.finish_reason != "error":
                self.prefix.register(seq, len(seq.prompt_ids))
        return generated

    def _span(self, batch: list[Sequence], starts: list[int], ends: list[int]):
        """tokens, positions, last index and valid (n, T) of the prompt positions [start, end) of each row,
        right-padded; padding repeats the row's last position."""
        width = max(end - start for start, end in zip(starts, ends))
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (seq, start, end) in enumerate(zip(batch, starts, ends)):
            tokens[i, :end - start] = torch.tensor(seq.prompt_ids[start:end])
        start, end = torch.tensor(starts)[:, None], torch.tensor(ends)[:, None]
        offsets = torch.arange(width)
        positions = torch.minimum(start + offsets, end - 1)
        valid = offsets < end - start
        return (tokens.to(self.device), positions.to(self.device), (end - start - 1)[:, 0].to(self.device),
                valid.to(self.device))

    def _decode(self, batch: list[Sequence]) -> int:
        batch = [s for s in batch if s.finish_reason is None]  # one alone after its batch failed may have ended
        if not batch:
            return 0
        tokens = torch.tensor([[s.output_ids[-1]] for s in batch], device=self.device)
        positions = torch.tensor([[s.length - 1] for s in batch], device=self.device)
        last = torch.zeros(len(batch), dtype=torch.long, device=self.device)
        tables = self._tables(batch, [s.length for s in batch])
        return self._forward(batch, tokens, positions, tables, last, decode=True)

    def _forward(self, batch: list[Sequence], tokens: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                 last: torch.Tensor, decode: bool, valid: Optional[torch.Tensor] = None,
                 active: Optional[torch.Tensor] = None) -> int:
        """Run `batch` on merged weights if the switching policy has them for it, else with its LoRA; sample;
        tell the policy how long it took (sampling's `.tolist()` waits for the device)."""
        switching = self.switching
        weights = switching.weights(batch, build=decode)  # a merge is timed as such, not as the step
        start = switching.timer()
        rows = [s.row_pairs for s in batch]
        lora = None if weights is not None else self._lora_for(rows) if decode else self.slots.batch(rows, active)
        generated = self._accept(batch, self.runner.forward(tokens, positions, tables, last, lora, weights, valid))
        switching.observe(len(batch), weights is not None, switching.timer() - start, decode)
        return generated

    def _lora_for(self, rows: list[RowPairs]) -> Optional[LoraBatch]:
        """This composition's LoRA, reused while the decode batch's composition stays the same."""
        key = (tuple(rows), self.slots.version)
        if self._batch_lora[0] != key:
            self._batch_lora = (key, self.slots.batch(rows))
        return self._batch_lora[1]

    def _accept(self, batch: list[Sequence], logits: torch.Tensor) -> int:
        """Sample each row's next token and hand it to its sequence; a row that cannot, ends with an error."""
        finite = torch.isfinite(logits).all(-1).tolist()
        for seq, ok in zip(batch, finite):
            if not ok:
                seq.end("error", NON_FINITE)
        rows = [i for i, ok in enumerate(finite) if ok]
        try:
            tokens = choose_next_tokens(logits[rows], [batch[i].params for i in rows],
                                        [batch[i].generator for i in rows])
        except Exception:  # find the row(s) at fault; the others keep their tokens
            tokens = []
            for i in rows:
                try:
                    tokens += choose_next_tokens(logits[i:i + 1], [batch[i].params], [batch[i].generator])
                except Exception as exc:
                    self._fail(batch[i], exc)
                    tokens.append(None)
        accepted = 0
        for i, token in zip(rows, tokens):
            if token is None:
                continue
            try:
                batch[i].accept(token, self.eos_ids)
                accepted += 1
            except Exception as exc:
                self._fail(batch[i], exc)
        return accepted

    # --- leaving -------------------------------------------------------------------------------------
    def _remove_finished(self) -> None:
        """Drop finished sequences: their slots and blocks go back (full blocks stay in the prefix cache)."""
        for i in reversed(range(len(self.running))):
            seq = self.running[i]
            if seq.finish_reason is None:
                continue
            self._release(seq)
            self.running.pop(i)

    def _acquire(self, seq: Sequence) -> tuple[int, ...]:
        """Pin a slot for each of the sequence's adapters; all or none (NoFreeSlot or an error frees those taken)."""
        taken: list[int] = []
        try:
            for info, _ in seq.adapters:
                taken.append(self.adapters.acquire(info))
        except BaseException:
            for slot in taken:
                self.adapters.release(slot)
            raise
        return tuple(taken)

    def _release(self, seq: Sequence) -> None:
        """Its slots and blocks back; what it wrote findable first (its last token was never fed back)."""
        for slot in seq.slots:
            self.adapters.release(slot)
        seq.slots = ()
        if seq.finish_reason != "error" and seq.block_table:
            self.prefix.register(seq, seq.length - 1)
        self.kv.release(seq.block_table)
