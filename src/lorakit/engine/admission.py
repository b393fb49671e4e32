"""Whether the engine takes a request: the checks `Engine.submit` and the engine process's front end share.

A refusal is a LorakitError the HTTP server turns into a status: RequestError (400) for a prompt that
cannot run, QueueFullError (429 with Retry-After) when the server-wide queue or the tenant's own share
of it is full.
"""

from __future__ import annotations

from typing import Optional

from lorakit.engine.sampling import SamplingParams
from lorakit.errors import QueueFullError, RequestError


def check_prompt(prompt_ids: list[int], params: SamplingParams, max_model_len: int, vocab_size: int) -> None:
    """The prompt is non-empty, its ids are in the vocabulary, and it fits the context with max_tokens."""
    if not prompt_ids:
        raise RequestError("the prompt is empty; send at least one token")
    if len(prompt_ids) + params.max_tokens > max_model_len:
        raise RequestError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                           f"the context length of {max_model_len} tokens; shorten one of them")
    # set(map(type, ...)), min and max run in C: a 2,000-token prompt is checked in ~30 µs, not ~0.6 ms
    if set(map(type, prompt_ids)) != {int} or min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
        raise RequestError(f"prompt token ids must be whole numbers in [0, {vocab_size})")


def check_queue(waiting: int, max_queue: int, tenant: Optional[str], tenant_waiting: int,
                max_queued: Optional[int], retry_after: float) -> None:
    """Room in the queue for one more request: server-wide, and within the tenant's `max_queued`."""
    if waiting >= max_queue:
        raise QueueFullError(f"{max_queue} requests are already waiting; retry later", retry_after=retry_after)
    if max_queued is not None and tenant_waiting >= max_queued:
        raise QueueFullError(f"{max_queued} requests of tenant {tenant!r} are already waiting (its max_queued); "
                             "retry later", retry_after=retry_after)


def estimated_wait(queued_tokens: int, tokens_per_second: float) -> float:
    """A rough Retry-After: the queue ahead at the current token rate; between 1 and 60 s."""
    return max(1.0, min(60.0, queued_tokens / (tokens_per_second or 1.0)))
