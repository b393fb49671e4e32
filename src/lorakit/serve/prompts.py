"""From a request's prompt or messages to the token ids the engine runs.

A completion's string prompt is tokenized as `lorakit generate` does (with the tokenizer's special
tokens); token ids are passed through (the engine checks their range). Chat messages go through the
tokenizer's chat template with the generation prompt appended, and the result is tokenized without
adding special tokens again, since the template writes its own.
"""

from __future__ import annotations

from typing import Union

from jinja2 import TemplateError

from lorakit.serve.error_responses import APIError


def completion_prompt_ids(tokenizer, prompt: Union[str, list[int]]) -> list[int]:
    if isinstance(prompt, list):
        return prompt
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise APIError(400, "the prompt is empty after tokenization", param="prompt")
    return ids


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]], model: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"the model {model!r} has no chat template; use /v1/completions with a plain prompt",
                       param="messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        raise APIError(400, f"the model's chat template refused these messages: {exc}", param="messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]
