"""Run the app under uvicorn until SIGTERM or Ctrl-C, then drain.

On SIGTERM (or the first Ctrl-C) the server stops taking requests at once while the engine finishes
what it is running and what is queued, for up to `drain_timeout` seconds; whatever is left then is
aborted (its client gets a 503 or an error chunk). The socket keeps listening meanwhile, so a new
request gets a clear 503 and /health says "draining" instead of connections being refused. Then
uvicorn closes the socket and waits for the last responses, and the process exits with status 0.
A second Ctrl-C quits at once (status 130). Stderr says what happens:

    lorakit serve: SIGTERM: draining 2 in-flight requests (up to 30 s) ...
    lorakit serve: stopped
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import threading
from typing import Optional

import uvicorn

from lorakit.errors import ConfigError
from lorakit.serve.app import ServeState, build_app
from lorakit.serve.connections import bounded_protocol

# After the engine's deadline, aborted requests still need a moment to send their answers.
RESPONSE_GRACE_SECONDS = 5.0
MAX_HEADER_BYTES = 16 * 1024  # request line and headers still incomplete past this: 400 (h11's own default)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free port), or a one-line ConfigError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining the engine on SIGTERM or Ctrl-C, saying so on stderr, and exiting 0."""

    def __init__(self, config: uvicorn.Config, serve: ServeState, drain_timeout: float, url: str):
        super().__init__(config)
        self.serve_state, self.drain_timeout, self.url = serve, drain_timeout, url
        self._drain: Optional[threading.Thread] = None
        self._stop_signal: Optional[int] = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            adapters = len(self.serve_state.engine.adapters())
            print(f"lorakit serve: {self.serve_state.base_name} and {adapters} adapter(s) at {self.url}", flush=True)

    def handle_exit(self, sig: int, frame) -> None:
        # Runs in the signal handler: nothing here may take a lock the interrupted main thread could hold
        # (the engine's stats), so the message is printed by shutdown(), on the event loop.
        if self.should_exit and sig == signal.SIGINT:  # a second Ctrl-C: stop at once
            self.force_exit = True
            return
        self._stop_signal = self._stop_signal or sig
        self.begin_drain()
        # Not uvicorn's handler: it would re-raise the signal after shutting down, so the process would end
        # "killed by SIGTERM" (or in a KeyboardInterrupt and its tracebacks); a requested stop is a clean exit.
        self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        if self._stop_signal is not None:
            stats = self.serve_state.engine.stats()
            in_flight = stats.waiting + stats.running
            sigterm = self._stop_signal == signal.SIGTERM
            how, again = ("SIGTERM", "") if sigterm else ("Ctrl-C", "; Ctrl-C again to stop at once")
            print(f"lorakit serve: {how}: draining {in_flight} in-flight request{'' if in_flight == 1 else 's'} "
                  f"(up to {self.drain_timeout:g} s{again}) ...", file=sys.stderr, flush=True)
        while self._drain is not None and self._drain.is_alive() and not self.force_exit:
            await asyncio.sleep(0.05)  # still listening: the gate answers new requests with 503
        await super().shutdown(sockets=sockets)

    def begin_drain(self) -> None:
        if self._drain is None:
            self.serve_state.draining = True
            self._drain = threading.Thread(target=self.serve_state.engine.shutdown, args=(self.drain_timeout,),
                                           name="lorakit-drain", daemon=True)
            self._drain.start()

    def finish(self) -> None:
        """After uvicorn has stopped: make sure the engine has stopped too (unless told to stop at once)."""
        self.begin_drain()
        if self.force_exit:  # the engine process, a daemon, ends with this one
            print("lorakit serve: stopped without draining", file=sys.stderr, flush=True)
        else:
            self._drain.join()
            print("lorakit serve: stopped", file=sys.stderr, flush=True)


def serve_forever(serve: ServeState, host: str, port: int, drain_timeout: float = 30.0,
                  log_level: str = "warning") -> int:
    sock = bind(host, port)
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    door = serve.door
    config = uvicorn.Config(build_app(serve), log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=drain_timeout + RESPONSE_GRACE_SECONDS,
                            http=bounded_protocol(door.header_timeout), limit_concurrency=door.max_connections,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_keep_alive=5)
    server = DrainingServer(config, serve, drain_timeout, f"http://{shown_host}:{bound_port}/v1")
    try:
        server.run(sockets=[sock])
    finally:
        server.finish()
        sock.close()
    return 130 if server.force_exit else 0  # 130: stopped by Ctrl-C, as a shell reports it
