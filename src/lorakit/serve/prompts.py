"""From a request's prompt or messages to the token ids the engine runs.

A completion's string prompt is tokenized as `lorakit generate` does (with the tokenizer's special
tokens); token ids are passed through (the engine checks their range). Chat messages become ids as
`lorakit generate --chat` makes them (`lorakit.data.chat.generation_prompt_ids`): the chat template with the
generation prompt appended, tokenized without adding special tokens again, since the template writes its own.
"""

from __future__ import annotations

from typing import Union

from lorakit.data.chat import generation_prompt_ids
from lorakit.errors import DataError
from lorakit.serve.error_responses import APIError


def completion_prompt_ids(tokenizer, prompt: Union[str, list[int]]) -> list[int]:
    if isinstance(prompt, list):
        return prompt
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise APIError(400, "the prompt is empty after tokenization", param="prompt")
    return ids


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]], model: str) -> list[int]:
    try:
        return generation_prompt_ids(tokenizer, messages, f"the model {model!r}",
                                     remedy="use /v1/completions with a plain prompt")
    except DataError as exc:  # no chat template, or the template refused the messages
        raise APIError(400, str(exc), param="messages") from None
