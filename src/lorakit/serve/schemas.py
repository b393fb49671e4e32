"""The request bodies the server accepts: OpenAI's fields, checked strictly.

A field OpenAI defines that changes nothing here (`user`, `metadata`, `store`, ...) is accepted and
ignored. A field OpenAI defines that lorakit does not implement (`logprobs`, `tools`, penalties, ...) is
accepted only at its neutral value, so a request never silently runs differently from what it asked for.
Any other field is refused with a 400 naming it. `top_k` and `ignore_eos` are vLLM's extensions.
Types are strict: "0.5" is not a number and `true` is not an integer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, field_validator

from lorakit.engine.sampling import SamplingParams


def neutral_only(*allowed: Any):
    """A real OpenAI field lorakit does not implement: accepted only at a value that changes nothing."""

    def check(value: Any) -> Any:
        if value is not None and value not in allowed:
            shown = " or ".join(repr(a) for a in allowed) if allowed else "null"
            raise ValueError(f"is not supported by lorakit serve; leave it out or set it to {shown}")
        return value

    return Annotated[Any, AfterValidator(check)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: Optional[bool] = None  # no obfuscation padding is sent either way


class GenerationRequest(Strict):
    """The fields completions and chat completions share."""

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: Any = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = None
    user: Optional[str] = None
    ignore_eos: bool = False
    frequency_penalty: neutral_only(0) = None
    presence_penalty: neutral_only(0) = None
    logit_bias: neutral_only({}) = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: Optional[int]) -> Optional[int]:
        if n not in (None, 1):
            raise ValueError(f"must be 1 (one choice per request), got {n}; send separate requests for more")
        return n

    @field_validator("seed")
    @classmethod
    def _64_bit_seed(cls, seed: Optional[int]) -> Optional[int]:
        if seed is not None and not -2**63 <= seed < 2**63:
            raise ValueError("must fit in 64 bits")
        return seed

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: Any) -> Any:
        if stop is None or isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            return stop
        raise ValueError("must be a string or a list of strings")

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options, info):
        if options is not None and not info.data.get("stream"):
            raise ValueError('is only allowed with "stream": true')
        return options

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """OpenAI's defaults: temperature 1, top_p 1. Raises RequestError for an impossible value."""
        return SamplingParams(max_tokens=max_tokens,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p,
                              top_k=0 if self.top_k is None else self.top_k,
                              seed=self.seed, stop=self.stop or (), ignore_eos=self.ignore_eos)


class CompletionRequest(GenerationRequest):
    """POST /v1/completions. `prompt` is a string or a list of token ids; max_tokens defaults to 16."""

    prompt: Any
    best_of: neutral_only(1) = None
    echo: neutral_only(False) = None
    logprobs: neutral_only() = None
    suffix: neutral_only("") = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("is empty")
            return prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        if isinstance(prompt, list) and not prompt:
            raise ValueError("is empty")
        raise ValueError("must be a string or a list of token ids (one prompt per request)")


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Any
    name: Optional[str] = None
    tool_calls: neutral_only([]) = None
    refusal: neutral_only() = None
    function_call: neutral_only() = None
    audio: neutral_only() = None

    @field_validator("content")
    @classmethod
    def _text(cls, content: Any) -> str:
        """A string, or a list of {"type": "text", "text": ...} parts joined into one."""
        if isinstance(content, str):
            return content
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) and set(p) <= {"type", "text"}
                                             for p in content):
            return "".join(p["text"] for p in content)
        raise ValueError('must be a string or a list of {"type": "text", "text": "..."} parts (only text is served)')

    def for_template(self) -> dict[str, str]:
        # Chat templates predate OpenAI's "developer" role; it means what "system" means.
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions. max_completion_tokens (or max_tokens) defaults to the rest of the context."""

    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None
    parallel_tool_calls: Optional[bool] = None
    logprobs: neutral_only(False) = None
    top_logprobs: neutral_only(0) = None
    tools: neutral_only([]) = None
    tool_choice: neutral_only("none") = None
    functions: neutral_only([]) = None
    function_call: neutral_only("none") = None
    response_format: neutral_only({"type": "text"}) = None
    modalities: neutral_only(["text"]) = None
    audio: neutral_only() = None
    prediction: neutral_only() = None
    reasoning_effort: neutral_only() = None
    verbosity: neutral_only() = None
    web_search_options: neutral_only() = None

    @field_validator("messages")
    @classmethod
    def _some(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise ValueError("must hold at least one message")
        return messages

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LoadAdapterRequest(Strict):
    """POST /v1/load_lora_adapter, as vLLM spells it; lora_source (lorakit's): "local" (a folder under an
    adapter root) or "hub" (a repo id), default by the server's policy (serve/adapter_sources.py)."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False
    lora_source: Optional[Literal["local", "hub"]] = None


class UnloadAdapterRequest(Strict):
    """POST /v1/unload_lora_adapter, as vLLM spells it (vLLM's optional lora_int_id is accepted and unused)."""

    lora_name: str
    lora_int_id: Optional[int] = None
