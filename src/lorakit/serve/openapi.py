"""The OpenAPI document (/openapi.json, /docs) as the server behaves, so generated clients agree with it.

Every status an endpoint can answer is listed with OpenAI's error shape; FastAPI's 422 is left out because
validation errors are 400s here (error_responses.py). The 200 bodies are described by the models below,
which only document: the endpoints build their answers in openai_format.py. /metrics and the adapter
endpoints answer text/plain, a streamed generation text/event-stream, and /v1/ asks for the bearer key
when the server has keys.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from lorakit.serve.openai_format import ROUTE_SCORE, SERVED_BY


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every error, as OpenAI shapes it."""

    error: ErrorDetail


class Health(BaseModel):
    """200 {"status": "ok", ...} while serving; 503 while draining, or with a reason when the engine is stuck
    or dead (a load balancer takes the server out of rotation)."""

    status: Literal["ok", "draining", "stuck", "dead"]
    reason: Optional[str] = None
    lora_path: Optional[str] = None      # how adapters are applied: "cpu-kernel", "batched-products", ...
    adapter_dtype: Optional[str] = None  # the resident adapters' precision


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class Answer(BaseModel):
    """What a whole (non-streamed) completion and chat completion share."""

    id: str
    created: int
    model: str
    usage: Usage


class Completion(Answer):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: Optional[str]
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(Answer):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class AdapterTrust(BaseModel):
    """An adapter's version and trust status (serve/adapter_policy.py); OpenAI's clients ignore the field."""

    digest: str                      # "sha256:...": the adapter's content digest
    registry: Optional[str] = None   # "name@<12 hex>" when it came from --registry
    signed_by: Optional[str] = None  # the --trusted-key file that verified its signature
    vetted: Optional[str] = None     # the registry's vet verdict ("pass", "unvetted", ...)
    card: Optional[dict] = None      # its lorakit_card.json (base, data digests, eval, creator, date), data
                                     # files by name; vouched for only when signed_by is set; null without one


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None  # the base model's entry only
    lorakit: Optional[AdapterTrust] = None  # adapters' entries only


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


MEANINGS = {
    400: "The request cannot run: malformed JSON, a wrong type, an unknown or unsupported field, an impossible "
         "value, a prompt past the context, or a Host header that does not name this server",
    401: "No valid API key: send 'Authorization: Bearer <key>'",
    403: "The key, or the server's policy, does not allow this",
    404: "Unknown model (or one this key may not see), or adapter",
    408: "The body did not arrive within --body-timeout, or the request ran past --request-timeout",
    409: "The adapter name is taken or being loaded, or the adapter was unloaded while the request waited",
    413: "The body is larger than --max-request-bytes",
    415: "A POST body that is not 'Content-Type: application/json'",
    429: "The queue is full; Retry-After says when to try again",
    500: "An internal error",
    503: "The server is draining, or serving --max-connections already (Retry-After)",
}
EVERY = (400, 408, 413, 500, 503)  # the front door and the connection cap answer any request
KEYED = EVERY + (401,)
POSTED = KEYED + (415,)
GENERATION = POSTED + (403, 404, 409, 429)
ADAPTER_MANAGEMENT = POSTED + (403, 404, 409)


def responses(*statuses: int, ok: Optional[dict] = None) -> dict:
    """FastAPI's `responses=`: these error statuses in OpenAI's shape, and `ok` as the 200."""
    documented: dict[Union[int, str], dict[str, Any]] = {s: {"model": ErrorResponse, "description": MEANINGS[s]}
                                                         for s in statuses}
    if ok is not None:
        documented[200] = ok
    return documented


TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}}
EVENT_STREAM = {"text/event-stream": {"schema": {  # OpenAPI 3.1: the schema of each event
    "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}},
    "description": "With \"stream\": true, one server-sent event per piece of text, its data a chunk's JSON; the "
                   "last event's data is [DONE]"}}}
HEALTH = {**responses(*EVERY, ok={"model": Health, "description": "Serving"}),
          503: {"model": Union[Health, ErrorResponse], "description": "Draining, the engine stuck or dead, or "
                                                                       "serving --max-connections already"}}
METRICS = responses(*EVERY, ok={**TEXT, "description": "Prometheus text"})
MODELS = responses(*KEYED, ok={"model": ModelList, "description": "The models this key may use"})
SERVED_BY_HEADER = {SERVED_BY: {"schema": {"type": "string"}, "description": (
    "What served the request: 'base', the adapter's name ('name@version' when it came from the registry), or "
    "the mixture of \"adapters\" as 'a:0.7,b:-0.3'")},
                    ROUTE_SCORE: {"schema": {"type": "string"}, "description": (
    "With model \"auto\": the routing score (0-1) of the adapter nearest the prompt, which served it when the "
    "score reached --route-threshold; absent when the key may use no adapter with a routing signature")}}
COMPLETIONS = responses(*GENERATION, ok={"model": Completion, "content": EVENT_STREAM, "description": "The answer",
                                         "headers": SERVED_BY_HEADER})
CHAT = responses(*GENERATION, ok={"model": ChatCompletion, "content": EVENT_STREAM, "description": "The answer",
                                  "headers": SERVED_BY_HEADER})
ADAPTERS = responses(*ADAPTER_MANAGEMENT, ok={**TEXT, "description": "Success: ..."})


def install_openapi(app: FastAPI, base_model: str, keyed: bool, max_model_len: int, vocab_size: int) -> None:
    """Replace FastAPI's generated document with one that says what this server answers and accepts: its
    base model's name, and the bounds of max_tokens and token ids its model sets. Built on first request."""

    def document() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path, operations in doc["paths"].items():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
                    for status, response in operation["responses"].items():
                        content = response.get("content", {})
                        if status != "200" and "text/plain" in content:  # a text endpoint's errors are JSON too
                            content["application/json"] = content.pop("text/plain")
                    if keyed and path.startswith("/v1/"):
                        operation["security"] = [{"bearer": []}]
            components = doc.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            for request in ("CompletionRequest", "ChatCompletionRequest"):
                fields = schemas[request]["properties"]
                fields["model"]["examples"] = [base_model]
                for name in ("max_tokens", "max_completion_tokens"):
                    if name in fields:
                        _integer_member(fields[name])["maximum"] = max_model_len
            _integer_member(schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"][1]["items"])["maximum"] = (
                vocab_size - 1)
            if keyed:
                components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = document


def _integer_member(schema: dict) -> dict:
    """The integer schema inside an Optional's anyOf (or the schema itself)."""
    return next(member for member in schema.get("anyOf", [schema]) if member.get("type") == "integer")
