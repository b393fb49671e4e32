"""What a caller holds while the engine works on its request: a handle that streams `TokenEvent`s.

The engine runs in its own thread; a handle hands events across to the caller, either to an asyncio
event loop (`async for event in handle.stream()`, what the HTTP server uses) or to plain blocking code
(`handle.result()`, what benchmarks and tests use). `cancel()` is safe from any thread: the engine frees
the sequence's cache row and adapter pin before its next step.

Crossing into an event loop costs a wake-up of the loop (a write to its self-pipe and a callback), which
per token and per stream would cost the HTTP server more than a small model's decode step. So the engine
thread appends events to the handle and posts the handle to its loop's `Mailbox`, which wakes the loop
at most once however many handles and tokens arrive before the loop runs; `stream()` then takes every
event waiting for its request and yields them merged into one (their tokens and text joined). A stream
therefore gets one chunk per token while the server keeps up, and fewer, longer chunks when it does not.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional

_ids = itertools.count()


@dataclass
class TokenEvent:
    """New output of one request. The last event of a request has `finish_reason` set.

    token_ids: tokens generated since the previous event (stop strings may hide some of their text).
    text:      text generated since the previous event, already cut at a stop string.
    finish_reason: None while running; "stop" (end-of-sequence token or stop string), "length"
               (max_tokens or the context is full), "abort" (cancelled, timed out or the engine stopped),
               "unloaded" (its adapter was unloaded or replaced while it waited; nothing was generated)
               or "error" (then `error` says why, and `internal` whether the server is at fault rather
               than the request or its adapter).
    """

    token_ids: list[int]
    text: str
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None
    internal: bool = False


@dataclass
class Completion:
    """A finished request, gathered from its events."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: Optional[str] = None


def merged(events: list[TokenEvent]) -> TokenEvent:
    """Consecutive events of one request as one: tokens and text joined, the last one's ending."""
    if len(events) == 1:
        return events[0]
    last = events[-1]
    return TokenEvent([t for e in events for t in e.token_ids], "".join(e.text for e in events), last.finish_reason,
                      last.prompt_tokens, last.completion_tokens, last.error, last.internal)


class Mailbox:
    """Hands handles with new events to one event loop, waking the loop at most once until it has run."""

    _by_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox]" = weakref.WeakKeyDictionary()
    _create_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._ready: list["RequestHandle"] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "Mailbox":
        with cls._create_lock:
            box = cls._by_loop.get(loop)
            if box is None:
                box = cls._by_loop[loop] = cls(loop)
            return box

    def post(self, handle: "RequestHandle") -> None:
        """Engine side: `handle` has new events."""
        with self._lock:
            wake = not self._ready
            self._ready.append(handle)
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                with self._lock:
                    self._ready.clear()
                handle.cancel()

    def _deliver(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for handle in ready:
            handle._arrived.set()


@dataclass
class RequestHandle:
    """The caller's side of one request."""

    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    created: float = field(default_factory=time.monotonic)
    _mailbox: Optional[Mailbox] = None
    _arrived: Optional[asyncio.Event] = None
    _pending: "collections.deque[TokenEvent]" = field(default_factory=collections.deque)
    _events: "queue.SimpleQueue[TokenEvent]" = field(default_factory=queue.SimpleQueue)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    first_token_at: Optional[float] = None
    on_cancel: Optional[Callable[[], None]] = None  # told once, on the first cancel (e.g. to tell another process)

    @classmethod
    def for_caller(cls) -> "RequestHandle":
        """A handle bound to the running event loop if there is one, else for blocking use."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return cls()
        return cls(_mailbox=Mailbox.of(loop), _arrived=asyncio.Event())

    # --- engine side ---
    def push(self, event: TokenEvent) -> None:
        if self.first_token_at is None and event.token_ids:
            self.first_token_at = time.monotonic()
        if self._mailbox is None:
            self._events.put(event)
            return
        self._pending.append(event)
        self._mailbox.post(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # --- caller side ---
    def cancel(self) -> None:
        """Stop generating; the engine frees the sequence before its next step. Safe from any thread."""
        first = not self._cancelled.is_set()
        self._cancelled.set()
        if first and self.on_cancel is not None:
            self.on_cancel()

    async def stream(self, deadline: Optional[float] = None) -> AsyncIterator[TokenEvent]:
        """Events as they come (all those waiting merged into one), ending with the one with `finish_reason`.

        deadline: the event loop's time after which waiting for the next event raises asyncio.TimeoutError
        (one timer for the whole request)."""
        if self._arrived is None:
            raise RuntimeError("this handle was created outside an event loop; use result()")
        loop = asyncio.get_running_loop()
        timer = loop.call_at(deadline, self._arrived.set) if deadline is not None else None
        try:
            while True:
                await self._arrived.wait()
                self._arrived.clear()
                waiting = []
                while self._pending:
                    waiting.append(self._pending.popleft())
                finished = bool(waiting) and waiting[-1].finish_reason is not None
                # Checked on every wake, not only an empty one: a fast engine keeps events waiting at
                # every wake, and the deadline must still end the request.
                if deadline is not None and not finished and loop.time() >= deadline:
                    raise asyncio.TimeoutError()
                if not waiting:
                    continue
                event = merged(waiting)
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if timer is not None:
                timer.cancel()

    def events(self, timeout: Optional[float] = None):
        """Blocking iterator over the events (for handles created outside an event loop)."""
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: Optional[float] = None) -> Completion:
        """Block until the request finishes and return everything it produced."""
        text, ids, last = [], [], None
        for event in self.events(timeout):
            text.append(event.text)
            ids.extend(event.token_ids)
            last = event
        return Completion("".join(text), ids, last.finish_reason, last.prompt_tokens, last.completion_tokens,
                          last.error)
