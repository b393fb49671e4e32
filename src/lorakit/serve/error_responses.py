"""Every error the server returns, in OpenAI's shape and with the status code a client can act on.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

400 a request the server cannot run (malformed JSON, a wrong type, an unknown field, an impossible
value), 401 no valid API key, 403 an action the key or the server's policy does not allow, 404 an
unknown model (or one the key may not see, word for word the same) or adapter path, 408 the request ran
past --request-timeout, 409 an adapter name taken or being loaded, or a queued request's adapter
unloaded, 429 the engine's queue or the tenant's max_queued is full (with Retry-After), 503 the server is
draining or the hub did not answer. FastAPI's own 422 validation errors become 400s naming the field.
The front door (front_door.py) adds 400 for a Host that does not name this server, 408 for a body that
does not arrive within --body-timeout, 413 for one past --max-request-bytes and 415 for a POST that is
not application/json.
"""

from __future__ import annotations

import math
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.errors import EngineStoppedError, LorakitError, QueueFullError, UnknownModelError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 405: "invalid_request_error", 408: "timeout_error", 409: "invalid_request_error",
         413: "invalid_request_error", 422: "invalid_request_error",
         415: "invalid_request_error",
         429: "rate_limit_error", 499: "client_closed_request", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error response: status code, message, and OpenAI's `type`, `param` and `code`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": _utf8(self.message), "type": TYPES.get(self.status, "server_error"),
                          "param": _utf8(self.param), "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _utf8(text: Optional[str]) -> Optional[str]:
    """Text that encodes as UTF-8: a message quoting a request's lone surrogate must not fail to render."""
    return text if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def from_lorakit_error(exc: LorakitError) -> APIError:
    """The response for an error the engine raised (its message is written for the user)."""
    if isinstance(exc, QueueFullError):
        retry = max(1, math.ceil(exc.retry_after))
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(retry)})
    if isinstance(exc, UnknownModelError):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, EngineStoppedError):
        return APIError(503, str(exc), code="draining")
    return APIError(400, str(exc))  # RequestError, AdapterError, AdapterFileError: the request's own fault


def _field_path(loc: tuple) -> str:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem of a rejected body, as a 400 naming its field."""
    error = exc.errors()[0]
    kind, field = error.get("type", ""), _field_path(tuple(error.get("loc", ())))
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON{': ' + str(detail) if detail else ''}")
    if kind == "extra_forbidden":
        return APIError(400, f"unknown field {field!r}", param=field, code="unknown_field")
    if kind == "missing":
        return APIError(400, f"{field!r} is required", param=field)
    if not field and kind == "string_unicode":  # a field's name holds a lone surrogate
        return APIError(400, "the request body holds a lone surrogate (\\ud800-\\udfff without its pair)")
    if not field:
        return APIError(400, "the request body must be a JSON object")
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    # Our own checks read on from the field's name ("stop must be ..."); pydantic's are sentences.
    return APIError(400, f"{field} {message}" if message[:1].islower() else f"{field}: {message}", param=field)


def install_handlers(app: FastAPI) -> None:
    """Make every error, including FastAPI's and Starlette's own, an OpenAI-shaped response."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(LorakitError)
    async def _refused(request: Request, exc: LorakitError) -> JSONResponse:
        return from_lorakit_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return APIError(exc.status_code, f"{message}: {request.method} {request.url.path}",
                        headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()
