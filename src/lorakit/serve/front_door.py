"""The front door: what every HTTP request must be before the gate and the endpoints see it.

    Host          names this server: an IP address, localhost, the --host value or one of --allowed-hosts
                  ("*": any name). Another name means a page in someone's browser reached the server through
                  DNS rebinding -> 400. Only the name is compared, not the port, so port forwarding works.
    CORS          no CORS headers at all unless --cors-origin names the origins a browser may call from.
    Content-Type  a POST is application/json -> else 415. The "simple" cross-site request a browser sends
                  without asking first carries text/plain, a form or no type at all, so a web page cannot
                  make a visitor's browser load adapters or spend the server's time.
    body size     at most --max-request-bytes: a larger Content-Length -> 413 before the body is read; a
                  chunked body is counted as it arrives -> 413 once past the limit.
    body time     the whole body within --body-timeout seconds of its headers -> else 408.

A 408 or 413 closes the connection, so no client makes the server read a body it has refused. The time
allowed for the headers themselves and the number of connections are the HTTP protocol's
business (connections.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware

from lorakit.serve.error_responses import APIError

CLOSE = {"Connection": "close"}  # on a refusal: the rest of the request is not worth reading


@dataclass
class FrontDoor:
    """The limits every request meets; the `lorakit serve` flags of the same names."""

    host: str = "127.0.0.1"                      # --host, the address the server listens on
    allowed_hosts: tuple[str, ...] = ()          # more names the Host header may carry; "*": any
    cors_origins: tuple[str, ...] = ()           # origins a browser may call from (none: no CORS headers)
    max_request_bytes: int = 2 * 1024 * 1024     # TGI's payload limit
    body_timeout: float = 30.0                   # seconds for a body to arrive after its headers
    header_timeout: float = 10.0                 # seconds for a request's line and headers to arrive
    max_connections: int = 512                   # connections served at once; past it: 503

    def names_this_server(self, host_header: str) -> bool:
        """Whether a Host header ("name", "name:port", "[v6]:port") is one this server answers to."""
        name = _host_name(host_header)
        if "*" in self.allowed_hosts or name in ("localhost", _host_name(self.host)):
            return True
        if name in (_host_name(h) for h in self.allowed_hosts):
            return True
        try:  # an address can't be rebound: a page whose origin is an address is that address
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:  # name:port (an IPv6 address without brackets has several colons)
        host = host.partition(":")[0]
    return host.rstrip(".")


class BodyRefused(APIError, HTTPException):
    """A 408 or 413 raised from `receive` while an endpoint reads the body. FastAPI re-raises an HTTPException
    from its body reading as it is (any other exception becomes a 400), and the APIError handler renders it.
    The connection closes after it: the rest of the body is not worth reading."""

    def __init__(self, status: int, message: str, code: str):
        APIError.__init__(self, status, message, code=code, headers=CLOSE)
        HTTPException.__init__(self, status, message, headers=CLOSE)


class HostCheck:
    """ASGI middleware: 400 for a Host header that does not name this server (DNS rebinding)."""

    def __init__(self, app, door: FrontDoor):
        self.app, self.door = app, door

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host")  # HTTP/1.0 may leave it out: no browser does
            if host is not None and not self.door.names_this_server(host):
                refusal = APIError(400, f"the Host header {host!r} does not name this server; if it should, start "
                                        "the server with --allowed-hosts naming it", param="Host",
                                   code="host_not_allowed", headers=CLOSE)
                return await refusal.response()(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a POST is JSON, and a body is at most `max_request_bytes`, read within `body_timeout`.

    A request answered before its body is read (415, 401, 404, ...) keeps its connection: uvicorn reads and
    drops the rest of the body, for at most --header-timeout seconds before the next request must start.
    """

    def __init__(self, app, door: FrontDoor):
        self.app, self.door = app, door

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers, limit = Headers(scope=scope), self.door.max_request_bytes
        length = _content_length(headers)
        if scope["method"] == "POST" and not _is_json(headers.get("content-type")):
            refusal = APIError(415, "the request body must be JSON, sent with 'Content-Type: application/json'",
                               code="unsupported_media_type")
            return await refusal.response()(scope, receive, send)
        if length is not None and length > limit:
            return await _too_large(limit).response()(scope, receive, send)

        loop = asyncio.get_running_loop()
        deadline, received = loop.time() + self.door.body_timeout, 0
        reading = bool(length) or (length is None and "transfer-encoding" in headers)

        async def receive_within_limits():
            nonlocal received, reading
            if not reading:  # the body is in (or there is none): the next message is the disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise BodyRefused(408, f"the request body did not arrive within {self.door.body_timeout:g} s",
                                  "body_timeout") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit)
                reading = message.get("more_body", False)
            return message

        await self.app(scope, receive_within_limits, send)


def _too_large(limit: int) -> BodyRefused:
    return BodyRefused(413, f"the request body is larger than the server's limit of {limit} bytes "
                            "(--max-request-bytes)", "request_too_large")


def _content_length(headers: Headers):
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):  # h11 refuses a malformed Content-Length before the app sees it
        return None


def _is_json(content_type) -> bool:
    return (content_type or "").partition(";")[0].strip().lower() == "application/json"


def install_front_door(app: FastAPI, door: FrontDoor) -> None:
    """Add the front door outside whatever middleware the app has so far (the host check outermost)."""
    app.add_middleware(BodyLimit, door=door)
    if door.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(door.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["Retry-After"], max_age=600)
    app.add_middleware(HostCheck, door=door)
