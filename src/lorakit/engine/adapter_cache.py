"""Many adapters registered, a bounded number resident in slots, least recently used evicted.

Registering an adapter (`register`, from any thread) reads and checks it at once into a `lorakit.Adapter`
value (or takes one already read), so a bad adapter is refused with a message while everyone else keeps
being served. The checked value is kept in memory: the engine thread never reads adapter files. It
`acquire`s an adapter for a sequence when the sequence is admitted: a resident adapter is reused (and
becomes most recently used), otherwise its factors are written into a free slot (the slots grow while
their memory budget allows) or into the least recently used slot that no running sequence holds. A
sequence holds (pins) its slot until it finishes, so eviction never pulls weights from under a running
sequence.

Slots are keyed by the adapter's digest, not by name: replacing an adapter under the same name
(`replace=True`) gives new requests the new content while running ones finish on the old, and two names
for identical files share one slot. A request that was queued for an adapter that has since been
unloaded or replaced fails with a message when it would be admitted, rather than run other weights.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lorakit.engine.layout import DecoderLayout
from lorakit.engine.lora_slots import LoraSlots
from lorakit.engine.served_adapter import ServedAdapter, fit_to_layout
from lorakit.errors import AdapterError, AdapterUnloadedError, UnknownModelError
from lorakit.io.adapter import DEFAULT_MAX_ADAPTER_BYTES, Adapter


@dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter as the API shows it."""

    name: str
    path: str
    rank: int
    digest: str
    resident: bool = False
    invocation: Optional[tuple[int, ...]] = None  # an activated LoRA's invocation tokens (alora.py)


def unknown_model(name: str) -> UnknownModelError:
    return UnknownModelError(f"the model {name!r} does not exist: it is neither the base model nor a loaded adapter "
                             "(GET /v1/models lists them)")


class NoFreeSlot(Exception):
    """Every slot holds an adapter that a running sequence uses; the request waits for one to finish."""


@dataclass
class _Slot:
    digest: str
    pins: int = 0


class AdapterCache:
    """Registry of adapters by name plus the LRU cache of resident ones (slot -> content)."""

    def __init__(self, layout: DecoderLayout, slots: LoraSlots, max_rank: int,
                 max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES):
        self.layout, self.slots, self.max_rank, self.max_adapter_bytes = layout, slots, max_rank, max_adapter_bytes
        self._registry: dict[str, AdapterInfo] = {}
        self._values: dict[str, ServedAdapter] = {}  # digest -> checked factors, for every registered digest
        self._resident: "OrderedDict[int, _Slot]" = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.loads = 0  # adapters written into a slot (for metrics and tests)

    # --- any thread ---
    def register(self, name: str, source: "str | Path | Adapter", replace: bool = False) -> AdapterInfo:
        if not isinstance(name, str) or not name.strip():
            raise AdapterError("an adapter needs a non-empty name")
        with self._lock:
            if name in self._registry and not replace:
                raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first or pass "
                                   "load_inplace=true to replace it")
        # Outside the lock: reading and checking takes time.
        adapter = source if isinstance(source, Adapter) else Adapter.read(source, max_bytes=self.max_adapter_bytes)
        served = fit_to_layout(adapter, self.layout, self.max_rank)
        self.slots.check_fits(served)
        invocation = adapter.config.alora_invocation_tokens
        info = AdapterInfo(name, adapter.source, served.rank, adapter.digest,
                           invocation=tuple(invocation) if invocation else None)
        with self._lock:
            self._registry[name] = info
            self._values[adapter.digest] = served
            self._forget_unused()
        return info

    def unregister(self, name: str) -> AdapterInfo:
        with self._lock:
            if name not in self._registry:
                raise UnknownModelError(f"no adapter named {name!r} is loaded")
            info = self._registry.pop(name)
            self._forget_unused()
        return info

    def _forget_unused(self) -> None:
        registered = {info.digest for info in self._registry.values()}
        for digest in [d for d in self._values if d not in registered]:
            del self._values[digest]

    def is_current(self, info: AdapterInfo) -> bool:
        """Whether `info` is still what its name serves (not unloaded, not replaced)."""
        with self._lock:
            return self._registry.get(info.name) == info

    def lookup(self, name: str) -> AdapterInfo:
        with self._lock:
            info = self._registry.get(name)
        if info is None:
            raise unknown_model(name)
        return info

    def infos(self) -> list[AdapterInfo]:
        with self._lock:
            resident = {slot.digest for slot in self._resident.values()}
            return [AdapterInfo(i.name, i.path, i.rank, i.digest, i.digest in resident, i.invocation)
                    for i in self._registry.values()]

    @property
    def resident_count(self) -> int:
        return len(self._resident)

    # --- engine thread ---
    def acquire(self, info: AdapterInfo) -> int:
        """Pin the adapter's slot, writing it into one if it is not resident; returns the slot index.

        Raises AdapterUnloadedError when the adapter was unloaded or replaced since the request was queued,
        and NoFreeSlot when every slot is pinned (the request waits)."""
        with self._lock:
            if self._registry.get(info.name) != info:
                raise AdapterUnloadedError(info.name)
            slot = self._find(info.digest)
            if slot is not None:
                self._resident.move_to_end(slot)
                self._resident[slot].pins += 1
                return slot
            served = self._values[info.digest]
            slot = self._free_slot(served)
            self._resident[slot] = _Slot(info.digest, pins=1)  # claimed before the write, released if it fails
        try:
            self.slots.write(slot, served)
        except BaseException:
            with self._lock:
                del self._resident[slot]
            self.slots.clear(slot)
            raise
        with self._lock:
            self.loads += 1
        return slot

    def release(self, slot: int) -> None:
        with self._lock:
            self._resident[slot].pins -= 1

    def _find(self, digest: str) -> Optional[int]:
        for slot, entry in self._resident.items():
            if entry.digest == digest:
                return slot
        return None

    def _free_slot(self, incoming: ServedAdapter) -> int:
        """An empty slot (growing the slots while their memory budget allows), else the least recently used
        one that nothing pins (evicted); NoFreeSlot if none."""
        for slot in range(self.slots.num_slots):
            if slot not in self._resident:
                return slot
        if self.slots.grow(incoming):
            return self._free_slot(incoming)
        registered = {info.digest for info in self._registry.values()}
        # Prefer content no registered name uses any more (a replaced or unloaded adapter), then LRU order.
        for wanted_unregistered in (True, False):
            for slot, entry in self._resident.items():
                if entry.pins == 0 and (not wanted_unregistered or entry.digest not in registered):
                    del self._resident[slot]
                    return slot
        raise NoFreeSlot()
