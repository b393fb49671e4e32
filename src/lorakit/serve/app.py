"""The FastAPI app: OpenAI's endpoints, vLLM's adapter endpoints, health and metrics, over one Engine.

    GET  /v1/models                  the base model and the adapters this key may use (serve/tenancy.py)
    POST /v1/completions             prompt: a string or token ids; "stream": true for server-sent events
    POST /v1/chat/completions        messages through the tokenizer's chat template
    POST /v1/load_lora_adapter       {"lora_name", "lora_path", "load_inplace": false, "lora_source"}
    POST /v1/unload_lora_adapter     {"lora_name"}
                                     both: only with --allow-runtime-loading, for keys with can_load_adapters
                                     (403 otherwise); from where: serve/adapter_sources.py; which
                                     adapters (signed, vetted): serve/adapter_policy.py
    GET  /health                     200 while serving (with the LoRA path and the adapters' precision),
                                     503 while draining, or when the engine thread died or is stuck in
                                     one step past --stall-timeout (no key needed)
    GET  /metrics                    Prometheus text (no key needed: bind --host to a private interface
                                     or keep /metrics behind the proxy if its figures are sensitive)

A `model` that names an alias (serve/aliases.py) is served by one of its variants, sticky by the request's
`user` (else its key): `x-lorakit-adapter` names the variant, the response's `model` stays the alias. Every
completion's id is recorded with what served it and that adapter's version (serve/feedback.py), so POST
/v1/feedback maps to a variant and a version; the alias, feedback, leaderboard and playground endpoints are
in ab_routes.py.

`"model": "auto"` routes the prompt to the adapter, among those the key may use, whose routing signature it
fits (engine/routing.py, docs/routing.md), or to the base model below --route-threshold: the response's
`model` and `x-lorakit-adapter` name what served it, `x-lorakit-route-score` the nearest adapter's score.

Every completion and chat completion names what served it in the header `x-lorakit-adapter`: `base`, the
adapter's name (`name@version` when it came from the registry), or a mixture `a:0.7,b:-0.3` (the request's
"adapters", with `model` the base model's name; names percent-encoded where they hold other characters
than letters, digits and `-._~`).

Every request passes the front door first (front_door.py: the Host header, a POST's JSON content type,
the body's size and arrival time), and every /v1/ request then the gate: 503 while draining, 401
without a valid key; the gate also times and counts generation requests for /metrics. The engine's own
checks (the context length, token ids, the queue) answer with their messages as 400/404/429/503.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from lorakit.engine import Engine
from lorakit.engine.alora import append_invocation
from lorakit.engine.mixture import AdapterChoice, resolve as adapter_pairs
from lorakit.engine.remote import EngineProcess
from lorakit.engine.routing import DEFAULT_THRESHOLD, ROUTE_MODEL
from lorakit.errors import UnknownModelError
from lorakit.serve.adapter_policy import AdapterPolicy, AdapterRefused, Trust
from lorakit.serve.adapter_sources import AdapterSources
from lorakit.serve.ab_routes import install_ab_routes
from lorakit.serve.aliases import AliasTable, choose_variant, name_taken
from lorakit.serve.auth import KeyRing, Tenant
from lorakit.serve import openapi
from lorakit.serve.error_responses import APIError, install_handlers
from lorakit.serve.feedback import FeedbackStore, base_version, feedback_path
from lorakit.serve.front_door import FrontDoor, install_front_door
from lorakit.serve.generation import RequestRun
from lorakit.serve.metrics import ServeMetrics
from lorakit.serve.openai_format import DONE, ROUTE_SCORE, SERVED_BY, ResponseShape, sse
from lorakit.serve.prompts import chat_prompt_ids, completion_prompt_ids
from lorakit.serve.schemas import (ChatCompletionRequest, CompletionRequest, GenerationRequest, LoadAdapterRequest,
                                   UnloadAdapterRequest)
from lorakit.serve.tenancy import Tenancy, unknown_model

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
MIXTURE_LABEL = "mixture"  # the metrics label of every mixture (their number is unbounded)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class ServeState:
    """What every request handler shares: the engine, who may call, what runtime loading the operator
    allows, who owns which adapter, and the server's own figures. Adapters registered in the engine when
    this is made are the start-up adapters."""

    engine: "Engine | EngineProcess"
    keys: KeyRing
    request_timeout: float = 600.0
    door: FrontDoor = field(default_factory=FrontDoor)
    sources: AdapterSources = field(default_factory=AdapterSources)
    policy: AdapterPolicy = field(default_factory=AdapterPolicy)
    trust: dict = field(default_factory=dict)  # adapter name -> Trust (its registry version, signer, vet verdict)
    draining: bool = False
    metrics: Optional[ServeMetrics] = None
    started: int = field(default_factory=lambda: int(time.time()))
    loaded_at: dict = field(default_factory=dict)  # adapter name -> unix time it was loaded
    tenancy: Optional[Tenancy] = None
    route_threshold: float = DEFAULT_THRESHOLD  # model "auto": the score an adapter needs (--route-threshold)
    aliases: AliasTable = field(default_factory=AliasTable)
    feedback: Optional[FeedbackStore] = None  # where completions and their feedback are kept (serve/feedback.py)

    def __post_init__(self):
        self.metrics = self.metrics or ServeMetrics(self.engine)
        self.tenancy = self.tenancy or Tenancy(self.engine)
        if self.feedback is None:
            registry = self.policy.registry
            self.feedback = FeedbackStore(feedback_path(None, registry.storage.location if registry else None))

    @property
    def base_name(self) -> str:
        return self.engine.model_name

    def resolve(self, request: Request, body: GenerationRequest) -> AdapterChoice:
        """What serves a generation: the adapter its `model` names (None: the base model), or the mixture its
        `adapters` give (with `model` the base's name, else 400); 404 for any name unknown or not this key's."""
        caller = tenant(request)
        if body.adapters is None and body.model == ROUTE_MODEL:  # routed once its prompt is tokenized
            request.state.model_label = ROUTE_MODEL
            return ROUTE_MODEL
        if body.adapters is None and body.model in self.aliases:
            return self._variant(request, caller, body)
        if body.adapters is None:
            self.tenancy.find(caller, body.model)
            request.state.model_label = self.tenancy.label(body.model)
            return None if body.model == self.base_name else body.model
        if body.model != self.base_name:
            raise APIError(400, f"with \"adapters\", model must be the base model's name {self.base_name!r}, not "
                                f"{body.model!r}; a mixture is served on the base model", param="model")
        for name in body.adapters:
            self.tenancy.find(caller, name, f"adapters.{name}")
        request.state.model_label = MIXTURE_LABEL
        return dict(body.adapters)

    def _variant(self, request: Request, caller: Tenant, body: GenerationRequest) -> str:
        """The adapter an alias's split gives this request (sticky by `user`, else by the API key)."""
        alias = self.aliases.aliases[body.model]
        if not self.aliases.sees(caller, alias):
            raise unknown_model(body.model)
        variant = choose_variant(alias, body.user or request.headers.get("authorization") or None)
        try:
            self.engine.adapter(variant)
        except UnknownModelError:
            raise APIError(409, f"the alias {alias.name!r} sends this request to {variant!r}, which is no longer "
                                "loaded; re-weight the alias", param="model", code="alias_target_missing") from None
        request.state.model_label = self.tenancy.label(variant)
        request.state.ab = (self.aliases.label(alias), self.tenancy.label(variant), alias.name, variant)
        return variant

    def route_candidates(self, caller: Tenant) -> list[str]:
        """The adapters model "auto" may choose for `caller`: every one it may use (the engine keeps those with
        a routing signature)."""
        return [info.name for info in self.engine.adapters() if self.tenancy.sees(caller, info.name)]

    def served_by(self, choice: AdapterChoice) -> str:
        """The `x-lorakit-adapter` header's value for `choice` (see the module docstring)."""
        if choice is None:
            return "base"
        if isinstance(choice, str):
            return self._adapter_label(choice)
        return ",".join(f"{self._adapter_label(name)}:{float(weight)!r}" for name, weight in choice.items())

    def _adapter_label(self, name: str) -> str:
        registry = self.trust.get(name, Trust()).registry  # "name@<digest prefix>" when it came from the registry
        label = urllib.parse.quote(name, safe="")
        return f"{label}@{registry.partition('@')[2]}" if registry else label

    def on_end(self, run: RequestRun) -> None:
        run.request.state.status = run.status
        handle = run.handle
        if handle.first_token_at is not None:
            label = getattr(run.request.state, "model_label", "-")
            self.metrics.first_token.labels(model=label).observe(handle.first_token_at - handle.created)
            ab = getattr(run.request.state, "ab", None)
            if ab is not None:
                self.metrics.variant_first_token.labels(*ab[:2]).observe(handle.first_token_at - handle.created)
                if run.tokens > 1 and run.ended_at > handle.first_token_at:
                    rate = (run.tokens - 1) / (run.ended_at - handle.first_token_at)
                    self.metrics.variant_speed.labels(*ab[:2]).observe(rate)

    def version_of(self, choice: AdapterChoice) -> Optional[str]:
        """The adapter version serving `choice`: its digest, the base model's version, None for a mixture."""
        if choice is None:
            return base_version(self.base_name)
        if not isinstance(choice, str):
            return None
        try:
            return self.engine.adapter(choice).digest
        except UnknownModelError:  # unloaded since it was chosen: the request fails on its own
            return None

    def record(self, request: Request, id: str, model: str, served_by: str, version: Optional[str]) -> None:
        """Keep what served completion `id`, so feedback on it finds its variant and its version."""
        if self.feedback is not None:
            ab = getattr(request.state, "ab", None)
            self.feedback.record(id, tenant(request).name, model, served_by, *(ab[2:] if ab else (None, None)),
                                 version)


def tenant(request: Request) -> Tenant:
    return request.scope["state"]["tenant"]


class Gate:
    """ASGI middleware in front of /v1/: draining -> 503, bad key -> 401; times and counts generations."""

    def __init__(self, app, serve: ServeState):
        self.app, self.serve = app, serve

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        sent = {"status": 500}
        started = time.monotonic()

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            await send(message)

        try:
            if self.serve.draining:
                refusal = APIError(503, "the server is shutting down and takes no new requests", code="draining")
                return await refusal.response()(scope, receive, send_and_note)
            headers = dict(scope.get("headers") or [])
            state["tenant"] = self.serve.keys.tenant_for(headers.get(b"authorization", b"").decode("latin-1"))
            if state["tenant"] is None:
                refusal = APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                                   code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await refusal.response()(scope, receive, send_and_note)
            await self.app(scope, receive, send_and_note)
        finally:
            if scope["path"] in GENERATION_PATHS:
                status = state.get("status", sent["status"])
                self.serve.metrics.request_done(state.get("model_label", "-"), status, time.monotonic() - started)
                if "ab" in state:
                    self.serve.metrics.variant_done(*state["ab"][:2], status)


def build_app(serve: ServeState) -> FastAPI:
    app = FastAPI(title="lorakit serve", description="One base model, many LoRA adapters, OpenAI's API.")
    app.state.serve = serve
    install_handlers(app)
    app.add_middleware(Gate, serve=serve)
    install_front_door(app, serve.door)
    openapi.install_openapi(app, serve.base_name, serve.keys.required, serve.engine.max_model_len,
                            serve.engine.vocab_size)
    install_ab_routes(app, serve)
    engine = serve.engine

    @app.get("/health", responses=openapi.HEALTH)
    async def health():
        if serve.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        state, why = engine.health()
        if state != "ok":  # a load balancer takes this server out of rotation
            return JSONResponse({"status": state, "reason": why}, status_code=503)
        return {"status": "ok", **engine.describe()}

    @app.get("/metrics", response_class=PlainTextResponse, responses=openapi.METRICS)
    async def metrics():
        return Response(serve.metrics.text(), media_type=serve.metrics.content_type)

    @app.get("/v1/models", responses=openapi.MODELS)
    async def models(request: Request):
        base = {"id": serve.base_name, "object": "model", "created": serve.started, "owned_by": "lorakit",
                "root": serve.base_name, "parent": None, "max_model_len": engine.max_model_len}
        listed = [base] + [{"id": a.name, "object": "model", "created": serve.loaded_at.get(a.name, serve.started),
                            "owned_by": "lorakit", "root": a.path, "parent": serve.base_name,
                            "lorakit": serve.trust.get(a.name, Trust()).to_json(a.digest)}
                           for a in engine.adapters()]
        seen = [m for m in listed if serve.tenancy.sees(tenant(request), m["id"])]
        if await asyncio.to_thread(engine.routable, serve.route_candidates(tenant(request))):
            seen.append({"id": ROUTE_MODEL, "object": "model", "created": serve.started, "owned_by": "lorakit",
                         "root": None, "parent": serve.base_name})
        return {"object": "list", "data": seen}

    @app.post("/v1/completions", responses=openapi.COMPLETIONS)
    async def completions(body: CompletionRequest, request: Request):
        adapter = serve.resolve(request, body)
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        _within_context(max_tokens, "max_tokens")
        # Off the event loop: a 2 MB prompt takes a second or two to tokenize.
        prompt_ids = await asyncio.to_thread(completion_prompt_ids, engine.tokenizer, body.prompt)
        return await _generate(request, body, prompt_ids, max_tokens, adapter, ResponseShape(False, body.model))

    @app.post("/v1/chat/completions", responses=openapi.CHAT)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        adapter = serve.resolve(request, body)
        max_tokens = body.requested_max_tokens
        _within_context(max_tokens, "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens")
        messages = [m.for_template() for m in body.messages]
        prompt_ids = await asyncio.to_thread(chat_prompt_ids, engine.tokenizer, messages, body.model)
        if max_tokens is None:  # OpenAI's default: as long as the context allows
            max_tokens = engine.max_model_len - len(prompt_ids)
            if max_tokens < 1:
                raise APIError(400, f"the messages take {len(prompt_ids)} tokens and leave no room in the context "
                                    f"of {engine.max_model_len} tokens", param="messages")
        return await _generate(request, body, prompt_ids, max_tokens, adapter, ResponseShape(True, body.model))

    def _within_context(max_tokens: Optional[int], param: str) -> None:
        if max_tokens is not None and max_tokens > engine.max_model_len:
            raise APIError(400, f"{param} ({max_tokens}) is larger than the context length of {engine.max_model_len} "
                                "tokens", param=param)

    async def _generate(request: Request, body: GenerationRequest, prompt_ids: list[int], max_tokens: int,
                        adapter: AdapterChoice, shape: ResponseShape):
        caller = tenant(request)
        params, quota = body.sampling_params(max_tokens), {"max_running": caller.max_running,
                                                           "max_queued": caller.max_queued}
        scored = {}
        if adapter == ROUTE_MODEL:
            routed, handle = engine.submit_routed(prompt_ids, params, serve.route_candidates(caller),
                                                  serve.route_threshold, tenant=caller.name, **quota)
            route = await asyncio.wrap_future(routed)
            adapter = route.adapter
            request.state.model_label = serve.tenancy.label(adapter or serve.base_name)
            shape = ResponseShape(shape.chat, adapter or serve.base_name)
            scored = {ROUTE_SCORE: f"{route.score:.4f}"} if route.score is not None else {}
        else:
            if body.alora_append_invocation:
                prompt_ids = append_invocation(prompt_ids, adapter_pairs(adapter, engine.adapter))
                params.max_tokens = min(params.max_tokens, max(1, engine.max_model_len - len(prompt_ids)))
            handle = engine.submit(prompt_ids, params, adapter, tenant=caller.name, **quota)
        run = RequestRun(handle, request, serve.request_timeout, on_end=serve.on_end)
        served_by = {SERVED_BY: serve.served_by(adapter), **scored}
        serve.record(request, shape.id, shape.model, served_by[SERVED_BY], serve.version_of(adapter))
        if body.stream:
            return StreamingResponse(_events(run, shape, body.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **served_by},
                                     background=BackgroundTask(run.aclose))
        return JSONResponse(shape.response(await run.result()), headers=served_by)

    async def _events(run: RequestRun, shape: ResponseShape, include_usage: bool):
        try:
            if shape.chat:  # OpenAI's first chat chunk announces the role
                yield shape.chunk("", first=True, with_usage_field=include_usage)
            async for event in run.events():
                if event.text or event.finish_reason is not None:
                    yield shape.chunk(event.text, event.finish_reason, with_usage_field=include_usage)
                if event.finish_reason is not None and include_usage:
                    yield shape.usage_chunk(event.prompt_tokens, event.completion_tokens)
        except APIError as exc:  # the 200 is already sent: the error travels in the stream
            yield sse(exc.body())
        yield DONE

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=openapi.ADAPTERS)
    async def load_lora_adapter(body: LoadAdapterRequest, request: Request):
        _may_manage_adapters(request)
        if body.lora_name in serve.aliases:
            raise name_taken(body.lora_name, "lora_name")
        with serve.tenancy.load(tenant(request), body.lora_name, body.load_inplace):
            folder, entry = await serve.sources.locate(body.lora_path, body.lora_source, serve.policy)
            trust = await asyncio.to_thread(_admitted, folder, entry, body.lora_path)
            info = await asyncio.to_thread(engine.add_adapter, body.lora_name, str(folder), body.load_inplace)
            try:
                serve.policy.confirm(trust, info.digest)
            except AdapterRefused as exc:
                await asyncio.to_thread(engine.remove_adapter, body.lora_name)
                raise APIError(403, f"{body.lora_path}: {exc}", param="lora_path", code="adapter_refused") from None
        serve.loaded_at[body.lora_name] = int(time.time())
        serve.trust[body.lora_name] = trust
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=openapi.ADAPTERS)
    async def unload_lora_adapter(body: UnloadAdapterRequest, request: Request):
        _may_manage_adapters(request)
        serve.tenancy.unload(tenant(request), body.lora_name)
        serve.loaded_at.pop(body.lora_name, None)
        serve.trust.pop(body.lora_name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    def _admitted(folder, entry, shown: str) -> Trust:
        try:
            return serve.policy.admit(folder, entry, shown)
        except AdapterRefused as exc:
            raise APIError(403, str(exc), param="lora_path", code="adapter_refused") from None

    def _may_manage_adapters(request: Request) -> None:
        # 403, not vLLM's 404: the endpoint exists, and the answer says which flag would turn it on.
        if not serve.sources.runtime_loading:
            raise APIError(403, "loading and unloading adapters at run time is off on this server; the operator "
                                "turns it on with --allow-runtime-loading", code="runtime_loading_off")
        if not tenant(request).may_load:
            raise APIError(403, "this API key may not load or unload adapters", code="adapter_management_not_allowed")

    return app
