"""Connections: uvicorn's HTTP/1.1 protocol with a deadline for each request's headers and a cap on
connections answered in OpenAI's error shape.

uvicorn closes a connection left idle for `timeout_keep_alive` seconds after a response, but nothing limits
how long a client may take to send a request's line and headers: one that sends half a line and stalls
(slowloris) holds its connection for ever. Here every connection waits at most `header_timeout` seconds for
each request's headers, counted from when it opened or from its previous response; past that it is closed
(with a 408 if part of a request had arrived). The body's own deadline is the front door's (front_door.py).
Bytes that are not HTTP/1.1 (h11 refuses them) get a 400 in OpenAI's shape too, and the connection closes.

Past `max_connections` open connections or requests in flight (uvicorn's limit_concurrency), a request is
answered 503 with Retry-After and its connection closed.

Every TCP connection gets TCP_NODELAY. asyncio sets it only on sockets whose protocol number reads
IPPROTO_TCP, and the listening socket the server binds reads 0, so without this a response written in two
parts (headers, then body) waited, under Nagle's algorithm, for the client's delayed acknowledgement of the
first: every request after the first on a kept-alive connection took 40 ms longer on Linux, which is how
the official openai client sends them.
"""

from __future__ import annotations

import asyncio
import functools
import http
import json
import socket
from typing import Optional

from uvicorn.protocols.http.h11_impl import H11Protocol

from lorakit.serve.error_responses import APIError


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, one per connection, with the header deadline and the connection cap."""

    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._header_timer: Optional[asyncio.TimerHandle] = None
        # uvicorn would answer past limit_concurrency in plain text; `_admit` answers in OpenAI's shape.
        self.max_connections, self.limit_concurrency = self.limit_concurrency, None
        self._app, self.app = self.app, self._admit

    def connection_made(self, transport) -> None:
        connection = transport.get_extra_info("socket")
        if connection is not None and connection.family in (socket.AF_INET, socket.AF_INET6):
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        self._await_headers()

    def on_response_complete(self) -> None:
        self._await_headers()  # first: a pipelined request that super() parses cancels it again
        super().on_response_complete()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's line and headers are in
            self._cancel_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        self._cancel_header_timer()
        if not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a request came: say why the connection ends
            self._answer_and_close(APIError(408, f"the request's headers did not arrive within "
                                                 f"{self.header_timeout:g} s", code="header_timeout"))
        else:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """Bytes that are not HTTP/1.1 (uvicorn would answer in plain text; it has logged `msg`)."""
        self._answer_and_close(APIError(400, "the bytes received are not a valid HTTP/1.1 request",
                                        code="invalid_http"))

    def _answer_and_close(self, error: APIError) -> None:
        """Write `error` as the connection's last response, outside h11's bookkeeping, and close."""
        body = json.dumps(error.body()).encode()
        head = (f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode() + body)
        self.transport.close()

    async def _admit(self, scope, receive, send) -> None:
        # This request's own connection and task are already counted, hence ">".
        if self.max_connections is not None and (len(self.connections) > self.max_connections
                                                 or len(self.tasks) > self.max_connections):
            refusal = APIError(503, f"the server is serving its limit of {self.max_connections} connections; "
                                    "retry shortly", code="too_many_connections",
                               headers={"Retry-After": "1", "Connection": "close"})
            return await refusal.response()(scope, receive, send)
        await self._app(scope, receive, send)


def bounded_protocol(header_timeout: float):
    """The protocol class to pass as uvicorn's `http=`."""
    return functools.partial(BoundedH11Protocol, header_timeout=header_timeout)
