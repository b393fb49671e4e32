"""The engine in a process of its own, behind the calls of `Engine` that the HTTP server makes.

Python runs one thread at a time per process. With the engine in the server's process, the HTTP event
loop (parsing requests, writing a chunk per token) and the engine's step loop (hundreds of small tensor
operations a step, each dispatched from Python) take turns: on the embedded model the event loop held
the interpreter a third of the time and the engine ran at ~0.65x of its speed alone. So `lorakit serve`
runs the engine in a child process, as vLLM's V1 engine core does, and the two exchange messages:

    server process (EngineProcess)                    engine process (_engine_main)
    submit(...)       ── ("submit", id, ...) ──────▶  Engine.submit, with a handle that forwards events
    handle.stream()   ◀── ("events", [...], counts) ─  one message per step: every request's new tokens
    handle.cancel()   ── ("cancel", id) ───────────▶  the sequence is freed before the next step
    add/remove_adapter ── ("call", n, ...) ────────▶  read and checked there (never on the step loop)
                      ◀── ("reply", n, error, value)
    health(), stats() ◀── ("beat", ...) ───────────  every BEAT_SECONDS: health, stats, resident adapters
    shutdown(t)       ── ("shutdown", t) ──────────▶  drains for t seconds, answers the rest, exits

The server decides admission itself, so that a refusal is an HTTP status rather than an error inside a
stream: the prompt checks need only the context length and vocabulary (sent once at start), adapter
names are known because every load and unload goes through this object, and the queue is the requests in
flight minus those the engine reports running. The engine process checks again; a request it refuses
anyway ends with an error event.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import lorakit.errors as errors
from lorakit.engine.adapter_cache import AdapterInfo, unknown_model
from lorakit.engine.admission import check_prompt, check_queue, estimated_wait
from lorakit.engine.alora import activation_start
from lorakit.engine.engine import SHUTDOWN_GRACE_SECONDS, Engine, EngineConfig, EngineStats
from lorakit.engine.mixture import AdapterChoice, resolve
from lorakit.engine.requests import RequestHandle, TokenEvent
from lorakit.engine.routing import DEFAULT_THRESHOLD
from lorakit.engine.sampling import SamplingParams
from lorakit.errors import EngineStoppedError, LorakitError

log = logging.getLogger("lorakit.engine")
BEAT_SECONDS = 0.25
START_TIMEOUT_SECONDS = 600.0  # loading a large model from a slow disk


# --- errors across the pipe --------------------------------------------------------------------------
def _portable(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def _rebuilt(portable: tuple[str, str]) -> Exception:
    """The error the engine process raised, as the same LorakitError class here (else a RuntimeError)."""
    name, message = portable
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, LorakitError):
        exc = cls.__new__(cls)
        Exception.__init__(exc, message)
        if isinstance(exc, errors.QueueFullError):
            exc.retry_after = 1.0
        return exc
    return RuntimeError(f"{name}: {message}")


# --- the engine process ------------------------------------------------------------------------------
class _Outbox:
    """Events of every request, gathered between sends; one message per engine step."""

    def __init__(self):
        self.lock = threading.Condition()
        self.events: list[tuple[str, TokenEvent]] = []

    def add(self, request_id: str, event: TokenEvent) -> None:
        with self.lock:
            self.events.append((request_id, event))
            self.lock.notify()

    def take(self, timeout: float) -> list[tuple[str, TokenEvent]]:
        with self.lock:
            if not self.events:
                self.lock.wait(timeout)
            taken, self.events = self.events, []
        return taken


@dataclass
class _ForwardingHandle(RequestHandle):
    """The engine process's side of a request: its events go to the outbox, bound for the server."""

    outbox: Optional[_Outbox] = None

    def push(self, event: TokenEvent) -> None:
        self.outbox.add(self.id, event)


def _library_logging() -> tuple[int, bool]:
    """transformers' verbosity and progress bars as the server process has them (the CLI quiets them)."""
    from transformers.utils import logging as hf_logging

    return hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()


def _engine_main(config: EngineConfig, conn, library_logging: tuple[int, bool]) -> None:
    """The engine process: build the engine, then serve the server's commands until told to stop."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(library_logging[0])
    if not library_logging[1]:
        hf_logging.disable_progress_bar()
    send_lock = threading.Lock()

    def send(message) -> None:
        with send_lock:
            conn.send(message)

    try:
        engine = Engine(config, own_process=True)  # this process is the engine's alone: it sizes the thread pool
        engine.start()
    except BaseException as exc:  # a bad --model or setting: the server reports it and exits
        send(("failed", _portable(exc)))
        return
    send(("ready", {"model_name": engine.model_name, "max_model_len": engine.max_model_len,
                    "vocab_size": engine.vocab_size, "describe": engine.describe()}))
    outbox, handles = _Outbox(), {}
    stopping = threading.Event()

    def report() -> None:  # events as they come; a beat at least every BEAT_SECONDS
        last_beat = 0.0
        while not stopping.is_set():
            events = outbox.take(BEAT_SECONDS)
            running = Counter(s.tenant for s in list(engine.scheduler.running))
            if events:
                send(("events", events, sum(running.values()), dict(running)))
                for request_id, event in events:
                    if event.finish_reason is not None:
                        handles.pop(request_id, None)
            if time.monotonic() - last_beat >= BEAT_SECONDS:
                last_beat = time.monotonic()
                resident = [info.digest for info in engine.adapters() if info.resident]
                send(("beat", engine.health(), engine.stats(), resident, engine.describe(), sum(running.values()),
                      dict(running)))

    reporter = threading.Thread(target=report, name="lorakit-engine-report", daemon=True)
    reporter.start()
    calls = ThreadPoolExecutor(1, thread_name_prefix="lorakit-engine-calls")  # adapter reads, off the step loop

    def call(number: int, method: str, args: tuple) -> None:
        try:
            send(("reply", number, None, getattr(engine, method)(*args)))
        except BaseException as exc:
            send(("reply", number, _portable(exc), None))

    def route_for(prompt_ids: list[int], number: int, candidates: list[str], threshold: float):
        """Engine.route for a model "auto" request, answered as call `number`; returns the adapter chosen."""
        try:
            route = engine.route(prompt_ids, candidates, threshold)
        except BaseException as exc:
            send(("reply", number, _portable(exc), None))
            raise
        send(("reply", number, None, route))
        return route.adapter

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server is gone: nobody to answer
            message = ("shutdown", 0.0)
        kind = message[0]
        if kind == "submit":
            _, request_id, prompt_ids, params, adapter, tenant, max_running, max_queued, *routing = message
            handle = handles[request_id] = _ForwardingHandle(id=request_id, outbox=outbox)
            try:
                if routing:  # model "auto": route here, answer the route's call, queue on what it chose
                    adapter = route_for(prompt_ids, *routing)
                engine.submit(prompt_ids, params, adapter, tenant, max_running, max_queued, handle=handle)
            except Exception as exc:  # admitted by the server, refused here (e.g. unloaded meanwhile)
                outbox.add(request_id, TokenEvent([], "", "error", len(prompt_ids), 0, str(exc),
                                                  not isinstance(exc, LorakitError)))
        elif kind == "cancel":
            handle = handles.get(message[1])
            if handle is not None:
                handle.cancel()
        elif kind == "call":
            calls.submit(call, *message[1:])
        elif kind == "shutdown":
            engine.shutdown(message[1])
            calls.shutdown(wait=True)
            stopping.set()
            reporter.join()
            for request_id, event in outbox.take(0):  # the last aborts
                send(("events", [(request_id, event)], 0, {}))
            send(("stopped",))
            conn.close()
            # Nothing is left to do or say: run multiprocessing's finalizers (its semaphores) and skip the rest
            # of the interpreter's teardown, about a second of freeing torch's and transformers' state.
            multiprocessing.util._exit_function()
            os._exit(0)


# --- the server's side -------------------------------------------------------------------------------
class EngineProcess:
    """An `Engine` in a child process, with the calls the HTTP server makes (see the module docstring)."""

    def __init__(self, config: EngineConfig = EngineConfig(), tokenizer=None):
        from lorakit.models import load_tokenizer

        self.config = config
        context = multiprocessing.get_context("spawn")  # a clean interpreter: no inherited threads or locks
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_engine_main, args=(config, child, _library_logging()),
                                        name="lorakit-engine", daemon=True)
        self._process.start()
        child.close()
        # The tokenizer loads here while the engine process loads the model.
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
        ready = self._first_message()
        self.model_name, self.max_model_len = ready["model_name"], ready["max_model_len"]
        self.vocab_size = ready["vocab_size"]
        self._describe = ready["describe"]
        self._send_lock, self._state = threading.Lock(), threading.Lock()
        self._handles: dict[str, tuple[RequestHandle, Optional[str]]] = {}  # id -> (handle, tenant)
        self._running, self._running_by_tenant = 0, {}
        self._generated = 0  # tokens streamed back, counted here so /metrics is exact at once
        self._adapters: dict[str, AdapterInfo] = {}
        self._resident: set[str] = set()
        self._calls: dict[int, Future] = {}
        self._next_call = 0
        self._beat = (("ok", ""), EngineStats(0, 0, 0, 0.0, 0, 0), time.monotonic())
        self._accepting, self._stopped = True, threading.Event()
        self._reader = threading.Thread(target=self._read, name="lorakit-engine-reader", daemon=True)
        self._reader.start()

    def _first_message(self) -> dict:
        if not self._conn.poll(START_TIMEOUT_SECONDS):
            self._process.kill()
            raise errors.ModelError(f"the engine process did not start within {START_TIMEOUT_SECONDS:g} s")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            raise errors.ModelError(f"the engine process exited while starting (exit code "
                                    f"{self._process.exitcode}); see the messages above") from None
        if kind == "failed":
            self._process.join(5)
            raise _rebuilt(payload)
        return payload

    def start(self) -> "EngineProcess":
        return self  # the engine process runs from construction

    # --- adapters ------------------------------------------------------------------------------------
    def add_adapter(self, name: str, source: "str | Path", replace: bool = False) -> AdapterInfo:
        """Read and check the adapter folder in the engine process and register it; raises as Engine does."""
        info = self._call("add_adapter", name, str(source), replace)
        with self._state:
            self._adapters[name] = info
        return info

    def remove_adapter(self, name: str) -> AdapterInfo:
        info = self._call("remove_adapter", name)
        with self._state:
            self._adapters.pop(name, None)
        return info

    def adapter(self, name: Optional[str]) -> Optional[AdapterInfo]:
        if name in (None, self.model_name):
            return None
        with self._state:
            info = self._adapters.get(name)
        if info is None:
            raise unknown_model(name)
        return info

    def adapters(self) -> list[AdapterInfo]:
        with self._state:
            return [AdapterInfo(i.name, i.path, i.rank, i.digest, i.digest in self._resident, i.invocation)
                    for i in self._adapters.values()]

    def routable(self, names: list[str]) -> list[str]:
        return self._call("routable", list(names))

    # --- requests ------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: AdapterChoice = None,
               tenant: Optional[str] = None, max_running: Optional[int] = None,
               max_queued: Optional[int] = None, routing: tuple = ()) -> RequestHandle:
        """routing: submit_routed's (call number, candidates, threshold); () otherwise."""
        check_prompt(prompt_ids, params, self.max_model_len, self.vocab_size)
        # UnknownModelError, a bad mixture's or a missing aLoRA invocation's RequestError before anything is queued
        activation_start(prompt_ids, resolve(adapter, self.adapter))
        handle = RequestHandle.for_caller()
        with self._state:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down and takes no new requests")
            if self._stopped.is_set():
                raise EngineStoppedError("the engine process has stopped; the server cannot generate until it is "
                                         "restarted (GET /health says why)")
            tenants = Counter(t for _, t in self._handles.values())
            waiting = len(self._handles) - self._running
            tenant_waiting = tenants[tenant] - self._running_by_tenant.get(tenant, 0)
            check_queue(waiting, self.config.max_queue, tenant, tenant_waiting, max_queued,
                        estimated_wait(16 * waiting, self._beat[1].tokens_per_second))
            self._handles[handle.id] = (handle, tenant)
        handle.on_cancel = lambda: self._send(("cancel", handle.id))
        self._send(("submit", handle.id, list(prompt_ids), params, adapter, tenant, max_running, max_queued, *routing))
        return handle

    def submit_routed(self, prompt_ids: list[int], params: SamplingParams, candidates: list[str],
                      threshold: float = DEFAULT_THRESHOLD, tenant: Optional[str] = None,
                      max_running: Optional[int] = None, max_queued: Optional[int] = None) -> tuple[Future, RequestHandle]:
        """`Engine.submit_routed` in one message: the engine process routes the prompt and queues it on the
        route's choice at once; the Future gets the Route when its answer arrives."""
        routed, number = self._new_call()
        try:
            return routed, self.submit(prompt_ids, params, None, tenant, max_running, max_queued,
                                       (number, list(candidates), threshold))
        except BaseException:  # refused here (queue full, bad prompt): no answer will come
            with self._state:
                self._calls.pop(number, None)
            raise

    def health(self) -> tuple[str, str]:
        if not self._process.is_alive():
            return "dead", f"the engine process exited (code {self._process.exitcode})"
        health, _, received = self._beat
        silent = time.monotonic() - received
        if silent > max(self.config.stall_timeout, 10 * BEAT_SECONDS):
            return "stuck", f"the engine process has not answered for {silent:.0f} s"
        return health

    def stats(self) -> EngineStats:
        stats = self._beat[1]
        with self._state:
            in_flight = len(self._handles)
            running = min(self._running, in_flight)
        return replace(stats, waiting=in_flight - running, running=running,
                       generated_tokens_total=self._generated)

    def describe(self) -> dict:
        return dict(self._describe)

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop taking requests; the engine finishes what it can by the deadline, the rest are aborted."""
        with self._state:
            self._accepting = False
        if self._process.is_alive():
            self._send(("shutdown", drain_timeout))
            self._stopped.wait(drain_timeout + 2 * SHUTDOWN_GRACE_SECONDS)
            self._process.join(SHUTDOWN_GRACE_SECONDS)
        if self._process.is_alive():
            log.error("the engine process did not stop; killing it")
            self._process.kill()
            self._process.join(5)
        self._fail_all("abort", None)

    # --- plumbing ------------------------------------------------------------------------------------
    def _send(self, message) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):  # the engine process is gone; the reader fails what is in flight
            pass

    def _call(self, method: str, *args: Any) -> Any:
        future, number = self._new_call()
        self._send(("call", number, method, args))
        return future.result()

    def _new_call(self) -> tuple[Future, int]:
        """A Future for the engine process's reply under a new call number."""
        future: Future = Future()
        with self._state:
            self._next_call += 1
            number = self._next_call
            self._calls[number] = future
        return future, number

    def _read(self) -> None:
        """The reader thread: route every message of the engine process."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "events":
                _, events, running, by_tenant = message
                with self._state:
                    self._running, self._running_by_tenant = running, by_tenant
                    targets = [(self._handles.get(request_id), event) for request_id, event in events]
                    for request_id, event in events:
                        if event.finish_reason is not None:
                            self._handles.pop(request_id, None)
                    self._generated += sum(len(event.token_ids) for _, event in events)
                for target, event in targets:
                    if target is not None:
                        target[0].push(event)
            elif kind == "beat":
                _, health, stats, resident, describe, running, by_tenant = message
                with self._state:
                    self._resident, self._describe = set(resident), describe
                    self._running, self._running_by_tenant = running, by_tenant
                self._beat = (health, stats, time.monotonic())
            elif kind == "reply":
                _, number, error, value = message
                with self._state:
                    future = self._calls.pop(number)
                future.set_exception(_rebuilt(error)) if error is not None else future.set_result(value)
            elif kind == "stopped":
                self._stopped.set()
        self._stopped.set()
        self._fail_all("error", "the engine process stopped unexpectedly; the request was not completed")

    def _fail_all(self, reason: str, error: Optional[str]) -> None:
        with self._state:
            handles, self._handles = list(self._handles.values()), {}
            calls, self._calls = list(self._calls.values()), {}
        for handle, _ in handles:
            handle.push(TokenEvent([], "", reason, 0, 0, error, reason == "error"))
        for future in calls:
            future.set_exception(EngineStoppedError("the engine process stopped"))
