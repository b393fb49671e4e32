"""The serving engine: one base model, many adapters, one background thread that batches them all.

    engine = Engine(EngineConfig(model=None))          # the embedded model
    engine.add_adapter("reverse", "runs/reverse")
    engine.start()
    handle = engine.submit(prompt_ids, SamplingParams(max_tokens=32, temperature=0), adapter="reverse")
    print(handle.result().text)
    engine.shutdown()

`submit` and the adapter calls are safe from any thread (the HTTP server calls them from its event loop);
all model work happens on the engine thread, which runs `Scheduler.step` while there is work and sleeps
otherwise. Memory is fixed at start: the KV cache has `max_running` rows of `max_model_len` positions,
adapters live in `max_loaded_adapters` slots, and at most `max_queue` requests wait; past that `submit`
refuses with QueueFullError (HTTP 429) instead of growing.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lorakit.engine.adapter_cache import AdapterCache, AdapterInfo
from lorakit.engine.kv_cache import KVCache
from lorakit.engine.layout import DecoderLayout
from lorakit.engine.lora_slots import ADAPTER_DTYPES, LoraSlots
from lorakit.engine.requests import RequestHandle
from lorakit.engine.runner import DecoderRunner
from lorakit.engine.sampling import SamplingParams
from lorakit.engine.scheduler import Scheduler
from lorakit.engine.sequence import Sequence
from lorakit.engine.text import IncrementalText
from lorakit.errors import ConfigError, EngineStoppedError, QueueFullError, RequestError

log = logging.getLogger("lorakit.engine")
DEFAULT_MAX_MODEL_LEN = 4096


@dataclass
class EngineConfig:
    """How the engine loads its base model and how much it may hold.

    model: hub id or folder (None: the embedded model); dtype: "auto" (bf16 on CUDA, fp32 on a CPU), "fp32",
    "bf16"; max_running: sequences decoded together (KV cache rows); max_queue: requests waiting beyond
    them; max_loaded_adapters: adapter slots (the rest load from disk on first use); max_lora_rank: the
    largest rank accepted; max_model_len: context length (default: the model's, at most 4096);
    prefill_token_budget: prompt tokens prefilled in one step; auto_merge: run a decode batch whose rows
    all use one adapter on merged weights (one extra copy of the adapted weights in memory); quantize:
    "nf4" or "int8" to serve the base as `lorakit train --quantize` trains on it (the engine computes with
    those weights dequantized once at start: the quantized model's outputs, not its memory saving);
    adapter_dtype: precision of the resident adapter factors, "auto" (bf16 or fp16 while every resident
    adapter is exact in it, else fp32: never rounds an adapter), "bf16" (rounds fp32 adapters; half the
    bytes a mixed-adapter decode step reads) or "fp32" (see `lora_slots.py`).
    """

    model: Optional[str] = None
    dtype: str = "auto"
    device: str = "auto"
    max_running: int = 16
    max_queue: int = 64
    max_loaded_adapters: int = 8
    max_lora_rank: int = 64
    max_model_len: Optional[int] = None
    prefill_token_budget: int = 4096
    auto_merge: bool = False
    served_model_name: Optional[str] = None
    quantize: Optional[str] = None
    quantize_backend: str = "auto"
    quantize_embeddings: bool = False
    adapter_dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_running", "max_queue", "max_loaded_adapters", "max_lora_rank", "prefill_token_budget"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"dtype must be auto, fp32 or bf16, got {self.dtype!r}")
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


def _served_name(model: Optional[str]) -> str:
    from lorakit.models import EMBEDDED_NAME

    if model is None or model in ("embedded", EMBEDDED_NAME):
        return EMBEDDED_NAME
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


class Engine:
    def __init__(self, config: EngineConfig = EngineConfig(), model=None, tokenizer=None):
        """Load config.model, or serve a transformers `model` and `tokenizer` already in memory (used as they
        are: their device and dtype win over the config's; the model's linear weights are fused in place)."""
        from lorakit.models import load_model, load_tokenizer

        self.config = config
        device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if config.device == "auto" else config.device))
        # auto: bf16 on GPUs; fp32 on CPUs, where decoding a few rows at a time measured no faster in bf16
        # (benchmarks/serve_vs_peft.py) and fp32 keeps every request's output independent of its batch.
        precision = config.dtype if config.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
        if model is not None:
            param = next(model.parameters())
            device, dtype = param.device, param.dtype
        self.model = model.eval() if model is not None else load_model(config.model, dtype=dtype, device=device)
        if config.quantize:
            from lorakit.quant import quantize_model

            quantize_model(self.model, config.quantize, config.quantize_backend, embeddings=config.quantize_embeddings)
        self.model_name = config.served_model_name or (
            _served_name(config.model) if model is None else (model.config.name_or_path or "model"))
        self.layout = DecoderLayout(self.model)
        self.max_model_len = self._context_length(config.max_model_len)
        model_config = self.model.config
        head_dim = self.layout.layers[0].self_attn.head_dim
        self.kv = KVCache(self.layout.num_layers, config.max_running, model_config.num_key_value_heads,
                          self.max_model_len, head_dim, device, dtype)
        self.slots = LoraSlots(self.layout, config.max_loaded_adapters, device, dtype, config.adapter_dtype)
        self.adapter_cache = AdapterCache(self.layout, self.slots, config.max_lora_rank)
        self.runner = DecoderRunner(self.model, self.layout, self.kv)
        self.scheduler = Scheduler(self.runner, self.kv, self.slots, self.adapter_cache, self._eos_ids(),
                                   config.prefill_token_budget, config.auto_merge)
        self._inbox: list[Sequence] = []
        self._wake = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._generated = 0
        self._rate = (time.monotonic(), 0, 0.0)  # (window start, tokens in window, last rate)

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
        ids = {self.tokenizer.eos_token_id}
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
        return frozenset(i for i in ids if i is not None)

    # --- adapters (any thread) -----------------------------------------------------------------------
    def add_adapter(self, name: str, path: str, replace: bool = False) -> AdapterInfo:
        """Register an adapter folder under `name` after checking its files; raises with a message if bad."""
        if name == self.model_name:
            raise RequestError(f"{name!r} is the base model's name; choose another name for the adapter")
        return self.adapter_cache.register(name, path, replace=replace)

    def remove_adapter(self, name: str) -> None:
        """Forget an adapter; sequences already running on it finish on it."""
        self.adapter_cache.unregister(name)

    def adapter(self, name: Optional[str]) -> Optional[AdapterInfo]:
        """The adapter a request's model name selects; None for the base model; UnknownModelError otherwise."""
        return None if name in (None, self.model_name) else self.adapter_cache.lookup(name)

    def adapters(self) -> list[AdapterInfo]:
        return self.adapter_cache.infos()

    # --- requests (any thread) -----------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: Optional[str] = None) -> RequestHandle:
        """Queue a request; the handle streams its tokens. adapter None (or the base model's name): no adapter."""
        if not prompt_ids:
            raise RequestError("the prompt is empty; send at least one token")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise RequestError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                               f"the context length of {self.max_model_len} tokens; shorten one of them")
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be whole numbers in [0, {vocab})")
        info = self.adapter(adapter)
        handle = RequestHandle.for_caller()
        seq = Sequence(handle, list(prompt_ids), params, info, IncrementalText(self.tokenizer, params.stop),
                       params.max_tokens, params.generator())
        with self._wake:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down and takes no new requests")
            if len(self._inbox) + len(self.scheduler.waiting) >= self.config.max_queue:
                raise QueueFullError(f"{self.config.max_queue} requests are already waiting; retry later",
                                     retry_after=self._retry_after())
            self._inbox.append(seq)
            self._wake.notify()
        return handle

    def _retry_after(self) -> float:
        """A rough wait: the queue ahead at the current token rate, assuming short requests; 1 s at least."""
        rate = self._rate[2] or 1.0
        ahead = sum(s.max_new_tokens for s in list(self.scheduler.waiting)) + len(self._inbox) * 16
        return max(1.0, min(60.0, ahead / rate))

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.waiting) + len(self._inbox), len(self.scheduler.running),
                           self._generated, self._rate[2], self.adapter_cache.resident_count,
                           self.adapter_cache.loads)

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
            self._thread.join()
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
                    self._wake.wait(0.5)
                if self._stop:
                    break
            self.scheduler.waiting.extend(self._take_inbox())
            try:
                self._count(self.scheduler.step())
            except Exception as exc:  # a fault in the engine fails the requests in flight, not the server
                log.exception("engine step failed")
                self.scheduler.abort_all("error", f"internal engine error: {exc}")
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
