"""Many adapters registered, a bounded number resident in slots, least recently used evicted.

Registering an adapter (`register`, from any thread) reads and checks its files at once, so a bad adapter
is refused with a message while everyone else keeps being served; only its name, folder, rank and content
hash are kept. The engine thread `acquire`s an adapter for a sequence when the sequence is admitted: a
resident adapter is reused (and becomes most recently used), otherwise its files are read again from
disk into a free slot or into the least recently used slot that no running sequence holds. A sequence
holds (pins) its slot until it finishes, so eviction never pulls weights from under a running sequence.

Slots are keyed by content hash, not by name: replacing an adapter under the same name (`replace=True`)
gives new requests the new content while running ones finish on the old, and two names for identical
files share one slot. If an adapter's files change on disk after it was registered, loading it again for
a request fails with a message rather than serving content nobody registered.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lorakit.engine.adapter_files import read_adapter
from lorakit.engine.layout import DecoderLayout
from lorakit.engine.lora_slots import LoraSlots
from lorakit.errors import AdapterError, AdapterFileError, UnknownModelError


@dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter as the API shows it."""

    name: str
    path: str
    rank: int
    content_hash: str
    resident: bool = False


class NoFreeSlot(Exception):
    """Every slot holds an adapter that a running sequence uses; the request waits for one to finish."""


@dataclass
class _Slot:
    content_hash: str
    pins: int = 0


class AdapterCache:
    """Registry of adapters by name plus the LRU cache of resident ones (slot -> content)."""

    def __init__(self, layout: DecoderLayout, slots: LoraSlots, max_rank: int):
        self.layout, self.slots, self.max_rank = layout, slots, max_rank
        self._registry: dict[str, AdapterInfo] = {}
        self._resident: "OrderedDict[int, _Slot]" = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.loads = 0  # adapters read from disk into a slot (for metrics and tests)

    # --- any thread ---
    def register(self, name: str, path: str | Path, replace: bool = False) -> AdapterInfo:
        if not isinstance(name, str) or not name.strip():
            raise AdapterError("an adapter needs a non-empty name")
        with self._lock:
            if name in self._registry and not replace:
                raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first or pass "
                                   "load_inplace=true to replace it")
        weights = read_adapter(path, self.layout, self.max_rank)  # outside the lock: reading takes time
        info = AdapterInfo(name, str(weights.folder), weights.rank, weights.content_hash)
        with self._lock:
            self._registry[name] = info
        return info

    def unregister(self, name: str) -> None:
        with self._lock:
            if name not in self._registry:
                raise UnknownModelError(f"no adapter named {name!r} is loaded")
            del self._registry[name]

    def lookup(self, name: str) -> AdapterInfo:
        with self._lock:
            info = self._registry.get(name)
        if info is None:
            raise UnknownModelError(f"the model {name!r} does not exist: it is neither the base model nor a "
                                    "loaded adapter (GET /v1/models lists them)")
        return info

    def infos(self) -> list[AdapterInfo]:
        with self._lock:
            resident = {slot.content_hash for slot in self._resident.values()}
            return [AdapterInfo(i.name, i.path, i.rank, i.content_hash, i.content_hash in resident)
                    for i in self._registry.values()]

    @property
    def resident_count(self) -> int:
        return len(self._resident)

    # --- engine thread ---
    def acquire(self, info: AdapterInfo) -> int:
        """Pin the adapter's slot, loading it from disk if it is not resident; returns the slot index."""
        with self._lock:
            slot = self._find(info.content_hash)
            if slot is not None:
                self._resident.move_to_end(slot)
                self._resident[slot].pins += 1
                return slot
            slot = self._free_slot()
        weights = read_adapter(info.path, self.layout, self.max_rank)
        if weights.content_hash != info.content_hash:
            raise AdapterFileError(f"the files of adapter {info.name!r} in {info.path} changed after it was loaded "
                                   f"(sha256 {info.content_hash[:12]} -> {weights.content_hash[:12]}); load it again "
                                   "(POST /v1/load_lora_adapter with load_inplace=true) to serve the new content")
        self.slots.write(slot, weights)
        with self._lock:
            self._resident[slot] = _Slot(info.content_hash, pins=1)
            self.loads += 1
        return slot

    def release(self, slot: int) -> None:
        with self._lock:
            self._resident[slot].pins -= 1

    def _find(self, content_hash: str) -> Optional[int]:
        for slot, entry in self._resident.items():
            if entry.content_hash == content_hash:
                return slot
        return None

    def _free_slot(self) -> int:
        """An empty slot, else the least recently used one that nothing pins (evicted); NoFreeSlot if none."""
        for slot in range(self.slots.num_slots):
            if slot not in self._resident:
                return slot
        registered = {info.content_hash for info in self._registry.values()}
        # Prefer content no registered name uses any more (a replaced or unloaded adapter), then LRU order.
        for wanted_unregistered in (True, False):
            for slot, entry in self._resident.items():
                if entry.pins == 0 and (not wanted_unregistered or entry.content_hash not in registered):
                    del self._resident[slot]
                    return slot
        raise NoFreeSlot()
