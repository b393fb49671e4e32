"""What a caller holds while the engine works on its request: a handle that streams `TokenEvent`s.

The engine runs in its own thread; a handle hands events across to the caller, either to an asyncio
event loop (`async for event in handle.stream()`, what the HTTP server uses) or to plain blocking code
(`handle.result()`, what benchmarks and tests use). `cancel()` is safe from any thread: the engine frees
the sequence's cache row and adapter pin before its next step.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

_ids = itertools.count()


@dataclass
class TokenEvent:
    """New output of one request. The last event of a request has `finish_reason` set.

    token_ids: tokens generated since the previous event (stop strings may hide some of their text).
    text:      text generated since the previous event, already cut at a stop string.
    finish_reason: None while running; "stop" (end-of-sequence token or stop string), "length"
               (max_tokens or the context is full), "abort" (cancelled, timed out or the engine stopped),
               "unloaded" (its adapter was unloaded or replaced while it waited; nothing was generated)
               or "error" (then `error` says why).
    """

    token_ids: list[int]
    text: str
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None


@dataclass
class Completion:
    """A finished request, gathered from its events."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: Optional[str] = None


@dataclass
class RequestHandle:
    """The caller's side of one request."""

    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    created: float = field(default_factory=time.monotonic)
    _loop: Optional[asyncio.AbstractEventLoop] = None
    _async_events: Optional[asyncio.Queue] = None
    _events: "queue.SimpleQueue[TokenEvent]" = field(default_factory=queue.SimpleQueue)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    first_token_at: Optional[float] = None

    @classmethod
    def for_caller(cls) -> "RequestHandle":
        """A handle bound to the running event loop if there is one, else for blocking use."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return cls()
        return cls(_loop=loop, _async_events=asyncio.Queue())

    # --- engine side ---
    def push(self, event: TokenEvent) -> None:
        if self.first_token_at is None and event.token_ids:
            self.first_token_at = time.monotonic()
        if self._loop is None:
            self._events.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._async_events.put_nowait, event)
        except RuntimeError:  # the caller's loop has closed: nobody is listening any more
            self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # --- caller side ---
    def cancel(self) -> None:
        """Stop generating; the engine frees the sequence before its next step. Safe from any thread."""
        self._cancelled.set()

    async def stream(self) -> AsyncIterator[TokenEvent]:
        """Events as they come, ending with the one that has `finish_reason` set."""
        if self._async_events is None:
            raise RuntimeError("this handle was created outside an event loop; use result()")
        while True:
            event = await self._async_events.get()
            yield event
            if event.finish_reason is not None:
                return

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
