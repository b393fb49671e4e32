"""Waiting on one request the engine is running: its deadline, its client, and how it ended.

The engine frees a sequence only when its handle is cancelled, so every way a request can stop early
cancels it at once: the deadline passing (--request-timeout, 408), the client going away (499: a
non-streaming request's connection is watched while it waits; a streaming response is cancelled by
Starlette when its client disconnects, and the `finally` below runs), or the handler itself being
cancelled. A request the engine aborted on its own (shutdown past the drain deadline) is a 503; one
whose adapter was unloaded or replaced while it waited is a 409; one it failed is a 500 carrying the
engine's message.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

from fastapi import Request

from lorakit.engine.requests import RequestHandle, TokenEvent
from lorakit.serve.error_responses import APIError

CLIENT_CLOSED = 499  # nginx's code for "the client closed the request"; only ever seen in metrics


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


class RequestRun:
    """One admitted request. Iterate `events()` (streaming) or await `result()` (whole answer) once.

    `status` is the code the request ended with, for metrics, even when a stream already sent its 200;
    `on_end(run)` is called once when it ends, however it ends.
    """

    def __init__(self, handle: RequestHandle, request: Request, timeout: float,
                 on_end: Optional[Callable[["RequestRun"], None]] = None):
        self.handle, self.request, self.on_end = handle, request, on_end
        self.deadline = asyncio.get_running_loop().time() + timeout
        self.timeout = timeout
        self.status = 200
        self.client_gone = False
        self.tokens = 0  # tokens generated so far
        self.ended_at: Optional[float] = None  # time.monotonic() when it ended
        self._ended = False

    async def events(self) -> AsyncIterator[TokenEvent]:
        """The engine's events up to the last one; raises APIError if the request cannot finish normally."""
        stream = self.handle.stream(self.deadline)
        try:
            while True:
                try:
                    event = await stream.__anext__()
                except asyncio.TimeoutError:
                    raise APIError(408, f"the request ran past the server's {self.timeout:g} s limit and was cancelled",
                                   code="request_timeout") from None
                if event.finish_reason == "abort":
                    if self.client_gone:
                        raise APIError(CLIENT_CLOSED, "the client closed the request")
                    raise APIError(503, "the server stopped before the request finished", code="aborted")
                if event.finish_reason == "unloaded":
                    raise APIError(409, event.error or "the adapter was unloaded", code="adapter_unloaded")
                if event.finish_reason == "error":  # the server's fault, or the request's (its adapter's)
                    raise APIError(500 if event.internal else 422, f"generation failed: {event.error or 'unknown error'}",
                                   code="engine_error" if event.internal else "generation_failed")
                self.tokens += len(event.token_ids)
                yield event
                if event.finish_reason is not None:
                    return
        except APIError as exc:
            self.status = exc.status
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-stream
            self.status = CLIENT_CLOSED
            raise
        finally:
            self._end()

    def close(self) -> None:
        """After a streaming response is sent or abandoned. If its client left before the first chunk,
        `events()` never ran: this frees the sequence and reports the end instead."""
        if not self._ended:
            self.status = CLIENT_CLOSED
        self._end()

    async def aclose(self) -> None:
        """`close` for Starlette's background task (an async one runs on the loop, not in a worker thread)."""
        self.close()

    def _end(self) -> None:
        self.handle.cancel()  # a no-op once finished; otherwise frees the sequence now
        if not self._ended:
            self._ended = True
            self.ended_at = time.monotonic()
            if self.on_end is not None:
                self.on_end(self)

    async def result(self) -> Finished:
        """The whole answer, cancelling the request if its client disconnects while it waits."""
        watcher = asyncio.create_task(self._cancel_on_disconnect())
        try:
            parts, last = [], None
            async for event in self.events():
                parts.append(event.text)
                last = event
            return Finished("".join(parts), last.finish_reason, last.prompt_tokens, last.completion_tokens)
        finally:
            watcher.cancel()

    async def _cancel_on_disconnect(self) -> None:
        # The body has been read, so the next message on the channel is the disconnect.
        while (await self.request.receive())["type"] != "http.disconnect":
            pass
        self.client_gone = True
        self.handle.cancel()
