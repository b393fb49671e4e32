"""Activated LoRA (aLoRA) requests: where in its prompt the adapter takes over, found before it is queued.

An aLoRA adapter (`alora_invocation_tokens`, see `lorakit.core.variants.alora`) applies from the start t0
of the last occurrence of its invocation in the prompt on, and to every generated token; positions before
t0 are the base model's exactly. The engine runs those as the base (no LoRA work; their prefix cache
blocks are base blocks, shared with base requests and other aLoRAs) and the rest with the adapter.
Where PEFT runs a prompt lacking the invocation silently as the base, the engine refuses it, naming the
tokens; `append_invocation` adds them at the end instead (the server's opt-in `alora_append_invocation`).
An aLoRA is served alone, not inside a mixture.
"""

from __future__ import annotations

from typing import Optional

from lorakit.core.variants.alora import invocation_start
from lorakit.errors import RequestError


def _invocation(adapters: tuple) -> Optional[tuple[str, tuple[int, ...]]]:
    """(name, invocation tokens) of the aLoRA among a request's (AdapterInfo, weight) pairs; None if none."""
    found = [(info.name, info.invocation) for info, _ in adapters if info.invocation]
    if found and len(adapters) > 1:
        raise RequestError(f"adapter {found[0][0]!r} is an activated LoRA (it applies from its invocation tokens on) "
                           "and cannot be part of a mixture; send it alone")
    return found[0] if found else None


def activation_start(prompt_ids: list[int], adapters: tuple) -> Optional[int]:
    """Where the request's aLoRA takes over in `prompt_ids` (None for other requests); RequestError if the
    prompt lacks its invocation."""
    found = _invocation(adapters)
    if found is None:
        return None
    name, invocation = found
    start = invocation_start(prompt_ids, invocation)
    if start is None:
        raise RequestError(f"adapter {name!r} is an activated LoRA: it applies from its invocation tokens "
                           f"{list(invocation)} on, and this prompt does not contain them; put them where the adapter "
                           "should take over, or send \"alora_append_invocation\": true to append them")
    return start


def append_invocation(prompt_ids: list[int], adapters: tuple) -> list[int]:
    """`prompt_ids` with the request's aLoRA invocation appended when it does not already contain it."""
    found = _invocation(adapters)
    if found is None or invocation_start(prompt_ids, found[1]) is not None:
        return list(prompt_ids)
    return list(prompt_ids) + list(found[1])
