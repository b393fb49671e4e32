"""The serving engine: one base model, many adapters, one background thread that batches them all.

    engine = Engine(EngineConfig(model=None))          # the embedded model
    engine.add_adapter("reverse", "runs/reverse")
    engine.start()
    handle = engine.submit(prompt_ids, SamplingParams(max_tokens=32, temperature=0), adapter="reverse")
    print(handle.result().text)
    engine.shutdown()

`submit` and the adapter calls are safe from any thread (the HTTP server calls them from its event loop);
all model work happens on the engine thread, which runs `Scheduler.step` while there is work and sleeps
otherwise. Memory is bounded: the running sequences' keys and values and the prefix cache share one pool
of blocks of `kv_cache_memory` bytes (paged; on a CPU committed as written; see `kv_cache.py` and
`prefix_cache.py`), adapters live in slots that grow up to `max_loaded_adapters` within `adapter_memory`
bytes, and at most
`max_queue` requests wait; past that `submit` refuses with QueueFullError (HTTP 429) instead of growing.

A failure belongs to its request: an adapter that cannot be written into a slot, a forward pass that
raises, logits that are not finite, a token that cannot be decoded each end that request with an error
(see `Scheduler`), and the engine goes on serving the others. `health()` reports an engine thread that
died or has not finished a step for `stall_timeout` seconds, and `shutdown` returns by its deadline even
then.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lorakit.engine.adapter_cache import AdapterCache, AdapterInfo
from lorakit.engine.alora import activation_start
from lorakit.engine.admission import check_prompt, check_queue, estimated_wait
from lorakit.io.adapter import DEFAULT_MAX_ADAPTER_BYTES, Adapter
from lorakit.engine.kv_cache import KVCache
from lorakit.engine.layout import DecoderLayout
from lorakit.engine.lora_slots import ADAPTER_DTYPES, LoraSlots
from lorakit.engine.mixture import AdapterChoice, resolve
from lorakit.engine.prefix_cache import DEFAULT_BLOCK_SIZE, PrefixCache, PrefixStats
from lorakit.engine.requests import RequestHandle
from lorakit.engine.routing import DEFAULT_THRESHOLD, ROUTE_MODEL, Route, Router
from lorakit.engine.runner import DecoderRunner
from lorakit.engine.sampling import SamplingParams
from lorakit.engine.scheduler import Scheduler
from lorakit.engine.switching import SWITCHING_MODES, Switching, SwitchingStats
from lorakit.engine.sequence import Sequence
from lorakit.engine.text import IncrementalText
from lorakit.errors import ConfigError, EngineStoppedError, RequestError, UnknownModelError
from lorakit.models import PRECISIONS, stop_token_ids

log = logging.getLogger("lorakit.engine")
DEFAULT_MAX_MODEL_LEN = 4096
SHUTDOWN_GRACE_SECONDS = 5.0  # past the drain deadline, how long to wait for a stuck engine thread


@dataclass
class EngineConfig:
    """How the engine loads its base model and how much it may hold.

    model: hub id or folder (None: the embedded model); dtype: "auto" (bf16 on CUDA, fp32 on a CPU), "fp32",
    "bf16"; max_running: sequences decoded together (KV cache rows); max_queue: requests waiting beyond
    them; max_loaded_adapters: the most adapters resident at once (slots grow up to it while
    `adapter_memory` allows; the rest wait in memory and take the least recently used free slot);
    adapter_memory: bytes the resident adapters' slots may take (None: an eighth of the memory available
    at start, at least 64 MiB); max_adapter_bytes: the largest adapter weights file accepted;
    stall_timeout: seconds a step may take before `health()` calls the engine stuck; threads: intra-op
    threads of an engine in its own process (`EngineProcess`; None: `auto_threads`); max_lora_rank: the
    largest rank accepted; max_model_len: context length (default: the model's, at most 4096);
    prefill_token_budget: prompt tokens prefilled in one step; switching: "auto" (adapters take turns while
    requests contend for the rows, a turn on merged weights where the measured costs say it pays), "off"
    (always unmerged) or "merged" (merged whenever every row of a batch is on one adapter, in arrival
    order), see `switching.py` (one extra copy of an adapter's adapted projections in memory);
    switching_max_hold: seconds a request of another
    adapter may be held back while one adapter runs merged (None: 8 times a request's measured decode
    time, at least 1 s); quantize:
    "nf4" or "int8" to serve the base as `lorakit train --quantize` trains on it (the engine computes with
    those weights dequantized once at start: the quantized model's outputs, not its memory saving);
    adapter_dtype: precision of the resident adapter factors, "auto" (bf16 or fp16 while every resident
    adapter is exact in it, else fp32: never rounds an adapter), "bf16" (rounds fp32 adapters; half the
    bytes a mixed-adapter decode step reads) or "fp32" (see `lora_slots.py`); trust_pickle: also load a
    base model whose weights are pickle files (they can run code on load; only for files you trust);
    kv_cache_memory: bytes the running sequences' keys and values and the prefix cache may take together
    (None: a quarter of the memory available at start, at least one sequence of max_model_len); prefix_cache:
    reuse the keys and values of prompt beginnings seen before (False: every prompt is prefilled whole, the
    reference path); share_prefix_cache_across_tenants: let one tenant's requests reuse another's blocks
    (off: a cache hit is observable in timing); kv_block_size: tokens per block of the paged KV cache.
    attention_kernel: decode attention through the compiled CPU kernel where it applies (None: where it can
    be built; False: the reference gather path, see `paged_attention.py`).
    """

    model: Optional[str] = None
    dtype: str = "auto"
    device: str = "auto"
    max_running: int = 16
    max_queue: int = 64
    max_loaded_adapters: int = 256
    adapter_memory: Optional[int] = None
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
    stall_timeout: float = 60.0
    threads: Optional[int] = None
    max_lora_rank: int = 64
    max_model_len: Optional[int] = None
    prefill_token_budget: int = 4096
    switching: str = "auto"
    switching_max_hold: Optional[float] = None
    served_model_name: Optional[str] = None
    quantize: Optional[str] = None
    quantize_backend: str = "auto"
    quantize_embeddings: bool = False
    adapter_dtype: str = "auto"
    trust_pickle: bool = False
    kv_cache_memory: Optional[int] = None
    prefix_cache: bool = True
    share_prefix_cache_across_tenants: bool = False
    kv_block_size: int = DEFAULT_BLOCK_SIZE
    attention_kernel: Optional[bool] = None

    def __post_init__(self) -> None:
        for name in ("max_running", "max_queue", "max_loaded_adapters", "max_lora_rank", "prefill_token_budget",
                     "kv_block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.kv_cache_memory is not None and (not isinstance(self.kv_cache_memory, int) or self.kv_cache_memory < 1):
            raise ConfigError(f"kv_cache_memory must be a number of bytes >= 1, got {self.kv_cache_memory!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads (--engine-threads) must be a whole number >= 1, got {self.threads!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.switching not in SWITCHING_MODES:
            raise ConfigError(f"switching must be one of {', '.join(SWITCHING_MODES)}, got {self.switching!r}")
        hold = self.switching_max_hold
        if hold is not None and (isinstance(hold, bool) or not isinstance(hold, (int, float)) or not hold > 0):
            raise ConfigError(f"switching_max_hold must be a number of seconds > 0 (or None), got {hold!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ConfigError(f"adapter_dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {self.adapter_dtype!r}")


@dataclass
class EngineStats:
    waiting: int
    running: int
    generated_tokens_total: int
    tokens_per_second: float
    resident_adapters: int
    adapter_loads_total: int
    switching: SwitchingStats = field(default_factory=SwitchingStats)
    prefix: PrefixStats = field(default_factory=PrefixStats)


PARAMETERS_PER_THREAD = 16_000_000


def auto_threads(model, parameters: Optional[int] = None) -> int:
    """Intra-op threads for decoding `model` on a CPU: one per 16M parameters, at most the cores.

    A decode step multiplies a few rows by every weight; below ~16M parameters per thread, splitting each
    product costs more in thread hand-offs than it saves (the embedded 5.7M model decodes 1.3x faster on
    one thread than on two, and a second thread is left for the HTTP front end)."""
    import os

    parameters = parameters if parameters is not None else sum(p.numel() for p in model.parameters())
    return max(1, min(len(os.sched_getaffinity(0)), parameters // PARAMETERS_PER_THREAD))


def _default_adapter_memory(device: torch.device) -> int:
    """An eighth of the memory available now (of the GPU's free memory on CUDA), at least 64 MiB."""
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        available = psutil.virtual_memory().available
    return max(64 << 20, available // 8)


def _kv_cache_memory(device: torch.device, requested: Optional[int], one_row: int, max_len: int) -> int:
    """The KV budget: `requested`, or a quarter of the memory available now (at least one full-length
    sequence, `one_row` bytes); ConfigError if it cannot hold one sequence of max_model_len."""
    if requested is None:
        if device.type == "cuda":
            available = torch.cuda.mem_get_info(device)[0]
        else:
            import psutil

            available = psutil.virtual_memory().available
        return max(one_row, available // 4)
    if requested < one_row:
        raise ConfigError(f"kv_cache_memory (--kv-cache-memory) of {requested} bytes cannot hold one sequence of "
                          f"max_model_len {max_len} ({one_row} bytes); raise it or lower max_model_len")
    return requested


def served_name(model: Optional[str]) -> str:
    """The name `lorakit serve` gives the base model `model` (a hub id, a folder's name, or the embedded one's)."""
    from lorakit.models import EMBEDDED_NAME

    if model is None or model in ("embedded", EMBEDDED_NAME):
        return EMBEDDED_NAME
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


class Engine:
    def __init__(self, config: EngineConfig = EngineConfig(), model=None, tokenizer=None, own_process: bool = False):
        """Load config.model, or serve a transformers `model` and `tokenizer` already in memory (used as they
        are: their device and dtype win over the config's; the model's linear weights are fused in place).
        own_process: this process is the engine's alone (`EngineProcess`): on a CPU its intra-op thread count
        is set here (config.threads, else `auto_threads`), before the runner times its projection forms,
        so that they are timed as they will run."""
        from lorakit.models import load_model, load_tokenizer

        self.config = config
        device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if config.device == "auto" else config.device))
        # auto: bf16 on GPUs; fp32 on CPUs, where decoding a few rows at a time measured no faster in bf16
        # (benchmarks/serve_vs_peft.py) and fp32 keeps every request's output independent of its batch.
        precision = config.dtype if config.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        dtype = PRECISIONS[precision]
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
        if model is not None:
            param = next(model.parameters())
            device, dtype = param.device, param.dtype
        self.model = model.eval() if model is not None else load_model(config.model, dtype=dtype, device=device,
                                                                       trust_pickle=config.trust_pickle)
        if config.quantize:
            from lorakit.quant import quantize_model

            quantize_model(self.model, config.quantize, config.quantize_backend, embeddings=config.quantize_embeddings)
        self.model_name = config.served_model_name or (
            served_name(config.model) if model is None else (model.config.name_or_path or "model"))
        self.layout = DecoderLayout(self.model)
        self.parameter_count = sum(p.numel() for p in self.model.parameters())  # before the runner empties modules
        if own_process and device.type == "cpu":
            torch.set_num_threads(config.threads or auto_threads(self.model, self.parameter_count))
        self.max_model_len = self._context_length(config.max_model_len)
        model_config = self.model.config
        head_dim = self.layout.layers[0].self_attn.head_dim
        position_bytes = 2 * self.layout.num_layers * model_config.num_key_value_heads * head_dim * dtype.itemsize
        block_bytes = position_bytes * config.kv_block_size
        one_row = -(-self.max_model_len // config.kv_block_size) * block_bytes
        budget = _kv_cache_memory(device, config.kv_cache_memory, one_row, self.max_model_len)
        self.kv = KVCache(self.layout.num_layers, model_config.num_key_value_heads, head_dim, config.kv_block_size,
                          device, dtype, budget, self.max_model_len, config.max_running)
        self.prefix = PrefixCache(self.kv, config.share_prefix_cache_across_tenants, config.prefix_cache)
        self.slots = LoraSlots(self.layout, config.max_loaded_adapters, device, dtype, config.adapter_dtype,
                               memory_budget=config.adapter_memory or _default_adapter_memory(device))
        self.adapter_cache = AdapterCache(self.layout, self.slots, config.max_lora_rank, config.max_adapter_bytes)
        # An engine that loaded its model owns it: the plain weights go once packed (runner.py)
        self.runner = DecoderRunner(self.model, self.layout, self.kv, config.attention_kernel,
                                    hold_weights_once=model is None)
        self.router = Router(self.model, self.runner.module_weights)
        switching = Switching(config.switching, self.runner, self.slots, self.adapter_cache.is_current,
                              config.max_running, config.switching_max_hold)
        self.scheduler = Scheduler(self.runner, self.kv, self.slots, self.adapter_cache, self._eos_ids(),
                                   config.prefill_token_budget, switching, self.prefix)
        self._inbox: list[Sequence] = []
        self._wake = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._generated = 0
        self._rate = (time.monotonic(), 0, 0.0)  # (window start, tokens in window, last rate)
        self._beat = time.monotonic()  # the engine thread's last sign of life (start of a step or of a wait)
        self._stepping = False

    def _context_length(self, requested: Optional[int]) -> int:
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        if window:  # beyond the window the model attends differently; the engine keeps to full attention
            limit = min(limit, window)
        if requested is None:
            return min(limit, DEFAULT_MAX_MODEL_LEN)
        if requested < 2 or requested > limit:
            raise ConfigError(f"max_model_len must be between 2 and {limit} for this model, got {requested}")
        return requested

    def _eos_ids(self) -> frozenset[int]:
        return frozenset(stop_token_ids(self.model, self.tokenizer))

    # --- adapters (any thread) -----------------------------------------------------------------------
    def add_adapter(self, name: str, source: "str | Path | Adapter", replace: bool = False) -> AdapterInfo:
        """Register an adapter (a folder, or an `Adapter` already read) under `name` after checking it; raises
        with a message if it is bad or cannot be served on this model."""
        if name == self.model_name:
            raise RequestError(f"{name!r} is the base model's name; choose another name for the adapter")
        if name == ROUTE_MODEL:
            raise RequestError(f"{name!r} asks for routing by prompt (model \"auto\"); choose another name for the "
                               "adapter")
        return self.adapter_cache.register(name, source, replace=replace)

    def remove_adapter(self, name: str) -> AdapterInfo:
        """Forget an adapter: sequences already running on it finish on it, queued ones fail with a message."""
        return self.adapter_cache.unregister(name)

    def adapter(self, name: Optional[str]) -> Optional[AdapterInfo]:
        """The adapter a request's model name selects; None for the base model; UnknownModelError otherwise."""
        return None if name in (None, self.model_name) else self.adapter_cache.lookup(name)

    def adapters(self) -> list[AdapterInfo]:
        return self.adapter_cache.infos()

    def route(self, prompt_ids: list[int], candidates: list[str], threshold: float = DEFAULT_THRESHOLD) -> Route:
        """Which of the adapters named `candidates` serves `prompt_ids` for model "auto" (routing.py): the one
        whose routing signature the prompt fits best, or the base model (Route.adapter None) when none reaches
        `threshold`. Names not (or no longer) registered are left out."""
        return self.router.route(prompt_ids, self._infos(candidates), threshold)

    def submit_routed(self, prompt_ids: list[int], params: SamplingParams, candidates: list[str],
                      threshold: float = DEFAULT_THRESHOLD, tenant: Optional[str] = None,
                      max_running: Optional[int] = None, max_queued: Optional[int] = None) -> tuple[Future, RequestHandle]:
        """`submit` for model "auto": the route among `candidates`, then the request queued on its choice.
        Returns the Route (as a done Future: EngineProcess's arrives from its engine process) and the handle."""
        check_prompt(prompt_ids, params, self.max_model_len, self.vocab_size)  # before its ids index anything
        route = self.route(prompt_ids, candidates, threshold)
        routed: Future = Future()
        routed.set_result(route)
        return routed, self.submit(prompt_ids, params, route.adapter, tenant, max_running, max_queued)

    def routable(self, names: list[str]) -> list[str]:
        """The adapters among `names` that model "auto" can route to: those with a usable routing signature."""
        return self.router.routable(self._infos(names))

    def _infos(self, names: list[str]) -> list[AdapterInfo]:
        infos = []
        for name in names:
            try:
                infos.append(self.adapter_cache.lookup(name))
            except UnknownModelError:  # unloaded meanwhile
                continue
        return infos

    # --- requests (any thread) -----------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: AdapterChoice = None,
               tenant: Optional[str] = None, max_running: Optional[int] = None,
               max_queued: Optional[int] = None, handle: Optional[RequestHandle] = None) -> RequestHandle:
        """Queue a request; the handle streams its tokens. adapter None (or the base model's name): no adapter;
        a name: that adapter; {name: weight, ...}: the exact mixture W + Σ w·s·B A of those adapters, computed in
        the batch like any other row (mixture.py; RequestError for a bad one, UnknownModelError for a name); an
        activated LoRA's prompt must hold its invocation (alora.py; RequestError naming it otherwise).
        tenant: who sent it, with its share of the engine: at most `max_running` of its sequences decode at
        once (the rest wait while other tenants' are admitted), at most `max_queued` of its requests wait
        (past that QueueFullError); None: no limit of its own. handle: where the events go (default: a
        handle for the calling thread or event loop)."""
        check_prompt(prompt_ids, params, self.max_model_len, self.vocab_size)
        adapters = resolve(adapter, self.adapter)
        activation = activation_start(prompt_ids, adapters)
        handle = handle or RequestHandle.for_caller()
        seq = Sequence(handle, list(prompt_ids), params, adapters, IncrementalText(self.tokenizer, params.stop),
                       params.max_tokens, params.generator(), tenant=tenant, tenant_max_running=max_running,
                       activation=activation)
        with self._wake:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down and takes no new requests")
            waiting = self._waiting()
            check_queue(len(waiting), self.config.max_queue, tenant, sum(s.tenant == tenant for s in waiting),
                        max_queued, self._retry_after())
            self._inbox.append(seq)
            self._wake.notify()
        return handle

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def describe(self) -> dict:
        """What /health shows of the engine: the LoRA path and the resident adapters' precision."""
        return {"lora_path": self.slots.path, "adapter_dtype": str(self.slots.dtype).removeprefix("torch.")}

    def _retry_after(self) -> float:
        """A rough wait: the queue ahead at the current token rate, assuming short requests; 1 s at least."""
        ahead = sum(s.max_new_tokens for s in list(self.scheduler.waiting)) + len(self._inbox) * 16
        return estimated_wait(ahead, self._rate[2])

    def _waiting(self) -> list[Sequence]:
        """Every submitted sequence not yet admitted (a snapshot: the engine thread moves them on)."""
        return list(self.scheduler.waiting) + list(self._inbox)

    def health(self) -> tuple[str, str]:
        """("ok", "") while the engine thread works; ("dead" | "stuck", why) otherwise."""
        if self._thread is not None and not self._thread.is_alive() and not self._stop:
            return "dead", "the engine thread has stopped"
        stalled = time.monotonic() - self._beat
        if self._stepping and stalled > self.config.stall_timeout:
            return "stuck", f"the engine has been in one step for {stalled:.0f} s"
        return "ok", ""

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.waiting) + len(self._inbox), len(self.scheduler.running),
                           self._generated, self._rate[2], self.adapter_cache.resident_count,
                           self.adapter_cache.loads, copy.copy(self.scheduler.switching.stats),
                           copy.copy(self.prefix.stats))

    # --- the engine thread ---------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop taking requests, let queued and running ones finish until the deadline, abort the rest."""
        with self._wake:
            self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self._thread is not None and time.monotonic() < deadline:
            with self._wake:
                if not self._inbox and not self.scheduler.has_work:
                    break
            time.sleep(0.01)
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(SHUTDOWN_GRACE_SECONDS)
            if self._thread.is_alive():  # stuck in a step: its requests are answered, the thread is left behind
                log.error("the engine thread did not stop within %.0f s of the drain deadline; its requests are "
                          "aborted", SHUTDOWN_GRACE_SECONDS)
                for seq in list(self.scheduler.waiting) + list(self.scheduler.running):
                    seq.end("abort")
                for seq in self._take_inbox():
                    seq.end("abort")
                return
            self._thread = None
        self.scheduler.abort_all()  # anything left when no thread ran (never started)
        for seq in self._take_inbox():
            seq.end("abort")

    def _take_inbox(self) -> list[Sequence]:
        with self._wake:
            taken, self._inbox = self._inbox, []
        return taken

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._stop and not self._inbox and not self.scheduler.has_work:
                    self._beat = time.monotonic()
                    self._wake.wait(0.5)
                if self._stop:
                    break
            self.scheduler.waiting.extend(self._take_inbox())
            self._beat, self._stepping = time.monotonic(), True
            try:
                self._count(self.scheduler.step())
            except Exception:  # the scheduler isolates each request's faults; this is a fault in itself
                log.exception("engine step failed outside any one request")
                self.scheduler.abort_all("error", "internal engine error; the request was not completed")
            finally:
                self._stepping = False
        self.scheduler.waiting.extend(self._take_inbox())
        self.scheduler.abort_all()

    def run_until_idle(self) -> None:
        """Step on the calling thread until every submitted request has finished (no engine thread)."""
        if self._thread is not None:
            raise RuntimeError("run_until_idle() is for an engine that was not start()ed")
        with torch.no_grad():
            while True:
                self.scheduler.waiting.extend(self._take_inbox())
                if not self.scheduler.has_work:
                    return
                self._count(self.scheduler.step())

    def _count(self, tokens: int) -> None:
        self._generated += tokens
        start, count, rate = self._rate
        now, count = time.monotonic(), count + tokens
        if now - start >= 1.0:
            self._rate = (now, 0, count / (now - start))
        else:
            self._rate = (start, count, rate)
