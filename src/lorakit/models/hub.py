"""Calls to the Hugging Face hub that fail in seconds, with one clear line, when the hub is out of reach.

Left to itself, huggingface_hub retries an unreachable hub with backoff (1 + 2 + 4 + 8 + 8 s for each
file it asks about), so an offline `lorakit generate --model owner/name` spent ~48 s before its error.
Every hub call lorakit makes (base models and tokenizers, adapters, the server's runtime loads) goes
through `from_hub` instead:

    HF_HUB_OFFLINE=1 set                                  the local cache only
    the hub answers one HEAD request within PROBE_SECONDS  the call as usual (downloads, newer revisions)
    it does not                                           the local cache only: what was fetched before loads
                                                          (in huggingface_hub's offline mode for the call, so
                                                          its side requests do not wait on the hub either)
    not in the cache either                               HubUnreachableError: check the network, or pass a
                                                          local folder
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

from lorakit.errors import LorakitError

PROBE_SECONDS = 3.0  # DNS, connect and answer: a reachable hub answers a HEAD in well under a second
REMEMBER_SECONDS = 30.0  # a model's tokenizer and weights load one after the other: one probe serves both

T = TypeVar("T")
_last_probe = (float("-inf"), False)  # (when, reachable)
_probe_lock, _offline_lock = threading.Lock(), threading.Lock()


class HubUnreachableError(LorakitError):
    """A hub id was asked for, the Hugging Face hub cannot be reached, and the local cache does not hold it."""


def hub_reachable() -> bool:
    """Whether the hub's endpoint (HF_ENDPOINT, default https://huggingface.co) answers within PROBE_SECONDS;
    remembered for REMEMBER_SECONDS. Any HTTP answer counts: only the network is in question here."""
    global _last_probe
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    with _probe_lock:
        when, reachable = _last_probe
        if time.monotonic() - when < REMEMBER_SECONDS:
            return reachable
        try:
            get_session().head(constants.ENDPOINT, timeout=PROBE_SECONDS)  # one try, no retries
            reachable = True
        except Exception:  # no DNS, refused, timed out, a proxy's error: all "not from here"
            reachable = False
        _last_probe = (time.monotonic(), reachable)
        return reachable


def from_hub(repo_id: str, fetch: Callable[[bool], T]) -> T:
    """fetch(local_files_only) for the hub repo `repo_id`: online when the hub answers, else from the local
    cache alone. A cache miss then is a one-line HubUnreachableError; fetch's other errors pass through."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline_by_choice = constants.is_offline_mode()
    if not offline_by_choice and hub_reachable():
        return fetch(False)
    try:
        with _offline_mode():
            return fetch(True)
    except Exception as exc:
        if not _caused_by(exc, LocalEntryNotFoundError):
            raise
    if offline_by_choice:
        why = "HF_HUB_OFFLINE is set"
        remedy = "unset HF_HUB_OFFLINE to download it, or pass a local folder"
    else:
        why = f"the Hugging Face hub ({constants.ENDPOINT}) could not be reached"
        remedy = ("check the network (or HF_ENDPOINT and the proxy settings), or pass a local folder; "
                  "HF_HUB_OFFLINE=1 uses only the cache")
    raise HubUnreachableError(f"{repo_id}: no such local folder, {why}, and the local cache "
                              f"({constants.HF_HUB_CACHE}) does not hold it; {remedy}")


@contextmanager
def _offline_mode() -> Iterator[None]:
    """huggingface_hub's offline switch (HF_HUB_OFFLINE), on for the duration: besides the files asked for,
    its request headers look up an agent registry on the hub (3 s against a hub that does not answer), and
    transformers asks for files its local_files_only does not cover. The hub is out of reach meanwhile, so
    no other call could have reached it either."""
    from huggingface_hub import constants

    with _offline_lock:
        saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = saved


def _caused_by(exc: BaseException, kind: type) -> bool:
    """Whether `exc` or an exception it was raised from or during is a `kind` (transformers wraps hub errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
