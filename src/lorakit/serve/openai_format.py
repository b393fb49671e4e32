"""Responses and stream chunks exactly as OpenAI shapes them, for completions and chat completions.

A stream is server-sent events: one `data: {chunk}` per piece of text, the last choice chunk carrying
`finish_reason`, then (with stream_options.include_usage) a chunk with no choices and the usage, then
`data: [DONE]`. A stream that cannot finish sends `data: {"error": {...}}` before `[DONE]`, which the
openai client raises as an APIError. Every generation's response also carries the header `x-lorakit-adapter`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from lorakit.serve.generation import Finished


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


DONE = sse("[DONE]")
SERVED_BY = "x-lorakit-adapter"  # lorakit's response header: what served a generation (serve/app.py)
ROUTE_SCORE = "x-lorakit-route-score"  # and for model "auto": the nearest adapter's routing score


@dataclass
class ResponseShape:
    """One response's id, model and kind ("text_completion" or "chat.completion")."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _choice(self, text: Optional[str], finish_reason: Optional[str], delta: bool, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if not delta:
            return {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None, "finish_reason": finish_reason}
        body = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish_reason}

    def response(self, done: Finished) -> dict:
        """The whole (non-streaming) response."""
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model,
                "choices": [self._choice(done.text, done.finish_reason, delta=False)],
                "usage": usage(done.prompt_tokens, done.completion_tokens)}

    def chunk(self, text: Optional[str], finish_reason: Optional[str] = None, first: bool = False,
              with_usage_field: bool = False) -> str:
        """One server-sent event carrying a piece of text (and the finish reason on the last one)."""
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model,
                "choices": [self._choice(text, finish_reason, delta=True, first=first)]}
        if with_usage_field:
            body["usage"] = None
        return sse(body)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> str:
        return sse({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                    "created": self.created, "model": self.model, "choices": [],
                    "usage": usage(prompt_tokens, completion_tokens)})
