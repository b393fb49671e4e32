"""The request bodies the server accepts: OpenAI's fields, checked strictly.

A field OpenAI defines that changes nothing here (`user`, `metadata`, `store`, ...) is accepted and
ignored. A field OpenAI defines that lorakit does not implement (`logprobs`, `tools`, penalties, ...) is
accepted only at its neutral value, so a request never silently runs differently from what it asked for.
Any other field is refused with a 400 naming it. `top_k` and `ignore_eos` are vLLM's extensions;
`adapters` ({"a": 0.7, "b": 0.3}: an exact mixture of adapters, with `model` the base) is lorakit's, and so
is `alora_append_invocation` (true: append an activated LoRA's invocation tokens to a prompt that lacks them,
instead of the 400 naming them).
Types are strict: "0.5" is not a number and `true` is not an integer; NaN and Infinity (which Python's
JSON reader accepts) are not numbers either, and text holding a lone surrogate ("\ud800") is not text.
The bounds (temperature, top_p, stop's size, ...) are SamplingParams', and appear in the OpenAPI document.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from lorakit.engine.mixture import MAX_MIXTURE, mixture_problem
from lorakit.engine.sampling import (MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TEMPERATURE, STOP_RULE, SamplingParams,
                                     stop_strings)
from lorakit.serve.aliases import check_targets


def unicode_text(text: str) -> str:
    """`text`, unless it holds a lone surrogate: JSON can spell one, but no tokenizer, path or UTF-8 answer can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone surrogate (\\ud800-\\udfff without its pair), which is not text") from None
    return text


Text = Annotated[str, AfterValidator(unicode_text)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
TokenId = Annotated[int, Field(ge=0)]


def neutral_only(*allowed: Any):
    """A real OpenAI field lorakit does not implement: accepted only at a value that changes nothing."""

    def check(value: Any) -> Any:
        if value is not None and value not in allowed:
            shown = " or ".join(repr(a) for a in allowed) if allowed else "null"
            raise ValueError(f"is not supported by lorakit serve; leave it out or set it to {shown}")
        return value

    documented = {"anyOf": [*({"const": a} for a in allowed), {"type": "null"}]} if allowed else {"type": "null"}
    return Annotated[Any, AfterValidator(check), WithJsonSchema(documented)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: Optional[bool] = None  # no obfuscation padding is sent either way


class GenerationRequest(Strict):
    """The fields completions and chat completions share."""

    model: Text
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    temperature: Optional[Annotated[float, Field(ge=0, le=MAX_TEMPERATURE)]] = None
    top_p: Optional[Annotated[float, Field(gt=0, le=1)]] = None
    top_k: Optional[Annotated[int, Field(ge=-1)]] = None
    seed: Optional[Annotated[int, Field(ge=-2**63, lt=2**63)]] = None
    stop: Optional[Union[StopString, Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Annotated[Optional[int], WithJsonSchema({"anyOf": [{"const": 1}, {"type": "null"}]})] = None
    user: Optional[str] = None
    ignore_eos: bool = False
    adapters: Optional[Annotated[dict[Text, float], Field(min_length=1, max_length=MAX_MIXTURE)]] = None
    alora_append_invocation: bool = False
    frequency_penalty: neutral_only(0) = None
    presence_penalty: neutral_only(0) = None
    logit_bias: neutral_only({}) = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: Optional[int]) -> Optional[int]:
        if n not in (None, 1):
            raise ValueError(f"must be 1 (one choice per request), got {n}; send separate requests for more")
        return n

    @field_validator("adapters", mode="before")
    @classmethod
    def _a_mixture(cls, adapters: Any) -> Any:
        """Adapter name -> finite weight, 1 to MAX_MIXTURE of them: the engine's rule (engine/mixture.py)."""
        problem = mixture_problem(adapters) if isinstance(adapters, dict) else None
        if problem:
            raise ValueError(problem)
        return adapters

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, stop: Any) -> Any:
        stops = stop_strings(stop)
        if stops is None:
            raise ValueError(STOP_RULE)
        for text in stops:
            unicode_text(text)
        return stop

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

    prompt: Union[Annotated[str, Field(min_length=1)], Annotated[list[TokenId], Field(min_length=1)]]
    best_of: neutral_only(1) = None
    echo: neutral_only(False) = None
    logprobs: neutral_only() = None
    suffix: neutral_only("") = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, (str, list)) and not prompt:
            raise ValueError("is empty")
        if isinstance(prompt, str):
            return unicode_text(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            return prompt
        raise ValueError("must be a string or a list of token ids >= 0 (one prompt per request)")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[Text] = None
    tool_calls: neutral_only([]) = None
    refusal: neutral_only() = None
    function_call: neutral_only() = None
    audio: neutral_only() = None

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, content: Any) -> str:
        """A string, or a list of {"type": "text", "text": ...} parts joined into one."""
        if isinstance(content, str):
            return unicode_text(content)
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) and set(p) <= {"type", "text"}
                                             for p in content):
            return unicode_text("".join(p["text"] for p in content))
        raise ValueError('must be a string or a list of {"type": "text", "text": "..."} parts (only text is served)')

    def for_template(self) -> dict[str, str]:
        # Chat templates predate OpenAI's "developer" role; it means what "system" means.
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions. max_completion_tokens (or max_tokens) defaults to the rest of the context."""

    messages: list[ChatMessage]
    max_completion_tokens: Optional[Annotated[int, Field(ge=1)]] = None
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

    lora_name: Text
    lora_path: Text
    load_inplace: bool = False
    lora_source: Optional[Literal["local", "hub"]] = None


class UnloadAdapterRequest(Strict):
    """POST /v1/unload_lora_adapter, as vLLM spells it (vLLM's optional lora_int_id is accepted and unused)."""

    lora_name: Text
    lora_int_id: Optional[int] = None


class AliasRequest(Strict):
    """POST /v1/aliases: create an alias or re-weight it; targets: adapter name (or registry reference) -> weight
    >= 0, at least one > 0 (serve/aliases.py)."""

    alias: Annotated[Text, Field(min_length=1, max_length=200)]
    targets: dict[Text, float]

    @field_validator("targets", mode="before")
    @classmethod
    def _weights(cls, targets: Any) -> Any:
        if isinstance(targets, dict):
            check_targets(targets, "targets")
        return targets


class FeedbackRequest(Strict):
    """POST /v1/feedback: a score, or a preference, for a completion this key was served; with `against` (another
    completion's id) the preference is a head-to-head vote, as the playground sends it."""

    id: Annotated[Text, Field(min_length=1, max_length=200)]
    score: Optional[float] = None
    preferred: Optional[bool] = None
    against: Optional[Annotated[Text, Field(min_length=1, max_length=200)]] = None

    @model_validator(mode="after")
    def _one_kind(self) -> "FeedbackRequest":
        if (self.score is None) == (self.preferred is None):
            raise ValueError('give either "score" (a number) or "preferred" (true or false)')
        if self.against is not None and self.preferred is None:
            raise ValueError('"against" goes with "preferred"')
        if self.against == self.id:
            raise ValueError('"against" must be another completion')
        return self
