"""Chat rows ({"messages": [{"role", "content"}, ...]}) rendered with the tokenizer's chat template and cut
into text segments that do or do not carry loss.

With R(m, g) the template's render of messages m (g: add_generation_prompt), assistant message i is the
text between R(messages[:i], True) and R(messages[:i+1], False): its content and the template's end of
turn, everything the model must produce after being prompted. Everything else (system, user and tool turns,
the role headers) is context. The segments tile R(messages, False) in order, so tokenizing them one by one
and concatenating gives ids in which the generation prompt for the last assistant turn is exactly a prefix.
"""

from __future__ import annotations

from jinja2 import TemplateError

from lorakit.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages, source: str) -> None:
    """Raise DataError unless `messages` is a list of {role, content: str} dicts with an assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{source}: field 'messages' must be a non-empty list of "
                        '{"role": ..., "content": ...} objects.')
    for number, message in enumerate(messages, start=1):
        where = f"{source}: messages[{number - 1}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f'{where} must be an object with "role" and "content".')
        if message["role"] not in ROLES:
            raise DataError(f"{where}: role {message['role']!r} is not one of {', '.join(ROLES)}.")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: field 'content' must be a string.")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{source}: the conversation has no assistant message, so nothing to learn. "
                        'Add a {"role": "assistant", ...} reply.')


def chat_segments(messages: list[dict], tokenizer, source: str) -> list[tuple[str, bool]]:
    """Consecutive (text, carries_loss) pieces of the template's render of `messages` (checked first)."""
    check_messages(messages, source)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source}: chat rows need a tokenizer with a chat template, and this one has none. "
                        "Use a chat model's tokenizer, or write the rows as prompt/completion.")
    full = _render(tokenizer, messages, False, source)
    segments, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_prefix_of(full, _render(tokenizer, messages[:i], True, source), source))
        end = len(_prefix_of(full, _render(tokenizer, messages[:i + 1], False, source), source))
        segments += [(full[done:start], False), (full[start:end], True)]
        done = end
    segments.append((full[done:], False))
    segments = [(text, labelled) for text, labelled in segments if text]
    if not any(labelled for _, labelled in segments):
        raise DataError(f"{source}: the chat template renders the assistant turns as no text, so there is "
                        "nothing to learn. Check the tokenizer's chat template.")
    return segments


def generation_prompt_ids(tokenizer, messages: list[dict], source: str,
                          remedy: str = "use a chat model's tokenizer") -> list[int]:
    """The ids that prompt a model to answer `messages`: R(messages, True), tokenized without adding special
    tokens, since the template writes its own (a BOS included, where the model has one).

    source: whose tokenizer it is, for errors ("the model 'x'"); remedy: what to do instead when it has no chat
    template. DataError when it has none or the template refuses the messages.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source} has no chat template; {remedy}")
    return list(tokenizer(_render(tokenizer, messages, True, source), add_special_tokens=False)["input_ids"])


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, source: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (TemplateError, ValueError, TypeError, KeyError) as e:
        raise DataError(f"{source}: the tokenizer's chat template refused the conversation ({e}). "
                        "Fix the messages (e.g. roles in the order the template expects).") from None


def _prefix_of(full: str, part: str, source: str) -> str:
    """`part`, checked to be a prefix of `full` (templates that rewrite earlier turns cannot be masked)."""
    if not full.startswith(part):
        raise DataError(f"{source}: the chat template renders earlier turns differently once later turns follow, "
                        "so the assistant turns cannot be located for the loss. Use a template that renders "
                        "turns incrementally, or write the rows as prompt/completion.")
    return part
