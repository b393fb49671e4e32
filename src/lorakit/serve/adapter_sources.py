"""Where a runtime load may read an adapter from: the operator's policy, and the one place that turns a
request's `lora_path` into a local folder for `engine.add_adapter`.

    POST /v1/load_lora_adapter {"lora_name": "n", "lora_path": "team-a/support", "lora_source": "local"}

local: `lora_path` is a folder inside one of the --adapter-root folders, absolute or relative to a root
(roots are tried in the order given). Symlinks are followed (os.path.realpath) before the check, and the
two adapter files must exist and resolve inside the same root as the folder. A path outside every root,
one that does not exist, a file and a folder without the two adapter files all get the same 404 naming
only the lora_path sent, so the answer tells a caller nothing about the server's files (no listing, no
server-side path).

hub (needs --allow-hub-downloads): `lora_path` is a hub repo id `owner/name`. Only adapter_config.json and
adapter_model.safetensors are fetched, after the hub's file listing shows both exist and together fit
--max-adapter-bytes. The request goes to the hub anonymously (token=False), never with the server's own
token, unless the operator passes --hub-token-for-loads. The whole fetch has a deadline (--hub-timeout);
a hub that does not answer by then is a 503. A hub out of reach is found in seconds (models/hub.py): the
adapter then loads from the server's local hub cache if it was fetched before, else the answer is a 503.

registry (needs --registry): `lora_path` is "registry:NAME" (the latest version) or
"registry:NAME@<digest prefix>", read from the registry's verified, read-only version folder; an unknown,
ambiguous or damaged reference is a 404 naming the reference (never the registry's location).

`lora_source` says which of local and hub a request means; left out, it is "local" whenever the server has a root and
"hub" only on a server with hub downloads and no root. A path is never looked up one way and then the
other, so a mistyped local path is never sent to the hub.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lorakit.errors import ConfigError
from lorakit.io.adapter import WEIGHTS_NAME
from lorakit.io.adapter_config import CONFIG_NAME
from lorakit.models import HUB_ID
from lorakit.models.hub import HubUnreachableError, from_hub
from lorakit.registry import Entry, RegistryError
from lorakit.serve.adapter_policy import AdapterPolicy, registry_version, scrub_registry_error
from lorakit.serve.error_responses import APIError

MAX_PATH_CHARS = 4096
DEFAULT_MAX_ADAPTER_BYTES = 2 * 10**9
DEFAULT_HUB_TIMEOUT = 300.0
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
REGISTRY_PREFIX = "registry:"


@dataclass(frozen=True)
class AdapterSources:
    """What runtime loading the operator allows. Off by default: no loading, no roots, no hub."""

    runtime_loading: bool = False
    roots: tuple[str, ...] = ()
    hub_downloads: bool = False
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
    hub_token: bool = False
    hub_timeout: float = DEFAULT_HUB_TIMEOUT
    registry: bool = False  # loads may name registry references (the server has --registry)

    def __post_init__(self) -> None:
        real = []
        for root in self.roots:
            if not os.path.isdir(root):
                raise ConfigError(f"--adapter-root {root}: no such folder")
            real.append(os.path.realpath(root))
        object.__setattr__(self, "roots", tuple(real))
        if self.runtime_loading and not self.roots and not self.hub_downloads and not self.registry:
            raise ConfigError("--allow-runtime-loading needs at least one --adapter-root DIR to load from (or "
                              "--allow-hub-downloads to load only hub ids, or --registry PATH to load only "
                              "registry references)")
        if self.max_adapter_bytes < 1 or self.hub_timeout <= 0:
            raise ConfigError("--max-adapter-bytes and --hub-timeout must be > 0")

    async def locate(self, lora_path: str, source: Optional[str],
                     policy: AdapterPolicy) -> tuple[Path, Optional[Entry]]:
        """The local folder a load request names, and its registry entry when it is a registry reference."""
        if not lora_path.startswith(REGISTRY_PREFIX):
            return await self.resolve(lora_path, source), None
        if policy.registry is None:
            raise APIError(400, "this server has no --registry, so registry: references cannot be loaded",
                           param="lora_path")
        try:
            return await asyncio.to_thread(registry_version, policy.registry,
                                           lora_path.removeprefix(REGISTRY_PREFIX))
        except RegistryError as exc:
            raise APIError(404, scrub_registry_error(exc, policy.registry), param="lora_path",
                           code="adapter_not_found") from None

    async def resolve(self, lora_path: str, source: Optional[str] = None) -> Path:
        """The local folder a load request names (a hub id is downloaded first); APIError if refused."""
        _check_text(lora_path)
        source = source or ("hub" if self.hub_downloads and not self.roots else "local")
        if source == "local":
            if not self.roots:
                raise APIError(400, "this server has no --adapter-root, so only hub ids can be loaded "
                                    "(lora_source: \"hub\")", param="lora_source")
            return await asyncio.to_thread(self._local, lora_path)
        if not self.hub_downloads:
            raise APIError(403, "loading adapters from the Hugging Face hub is off on this server; the operator "
                                "turns it on with --allow-hub-downloads", code="hub_downloads_off")
        if not HUB_ID.fullmatch(lora_path) or ".." in lora_path:
            raise APIError(400, "a hub adapter's lora_path must be a repo id owner/name", param="lora_path")
        try:
            return await _on_daemon_thread(self._download, lora_path, timeout=self.hub_timeout)
        except asyncio.TimeoutError:
            raise APIError(503, f"the Hugging Face hub did not answer within {self.hub_timeout:g} s; retry later",
                           code="hub_unavailable") from None

    def _local(self, lora_path: str) -> Path:
        candidates = [lora_path] if os.path.isabs(lora_path) else [os.path.join(r, lora_path) for r in self.roots]
        for candidate in candidates:
            folder = os.path.realpath(candidate)
            root = self._root_of(folder)
            if root is None or not os.path.isdir(folder):
                continue
            # The files themselves may be symlinks too: they must stay inside the folder's root.
            files = [os.path.join(folder, name) for name in ADAPTER_FILES]
            if all(os.path.isfile(f) and self._root_of(os.path.realpath(f)) == root for f in files):
                return Path(folder)
        raise APIError(404, f"no adapter folder {lora_path!r} under this server's adapter roots (an adapter folder "
                            f"holds {CONFIG_NAME} and {WEIGHTS_NAME})", param="lora_path", code="adapter_not_found")

    def _root_of(self, real_path: str) -> Optional[str]:
        for root in self.roots:
            if real_path == root or real_path.startswith(root.rstrip(os.sep) + os.sep):
                return root
        return None

    def _download(self, repo_id: str) -> Path:
        """The two adapter files of a hub repo, checked for size first, in the local hub cache."""
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, RepositoryNotFoundError,
                                            RevisionNotFoundError)

        token = None if self.hub_token else False  # None: whatever token the server's environment holds

        def fetch(local_only: bool) -> list[str]:
            if not local_only:  # (from the cache, the engine checks the files' size as it reads them)
                listed = HfApi().get_paths_info(repo_id, list(ADAPTER_FILES), token=token)
                sizes = {entry.path: getattr(entry, "size", None) or 0 for entry in listed}
                if set(sizes) != set(ADAPTER_FILES):
                    raise APIError(404, f"the hub repo {repo_id} has no {WEIGHTS_NAME} and {CONFIG_NAME}, or cannot "
                                        "be read without a token", param="lora_path", code="adapter_not_found")
                total = sum(sizes.values())
                if total > self.max_adapter_bytes:
                    raise APIError(400, f"the hub adapter {repo_id} is {total:,} bytes, above this server's limit of "
                                        f"{self.max_adapter_bytes:,} (--max-adapter-bytes)", param="lora_path",
                                   code="adapter_too_large")
            return [hf_hub_download(repo_id, name, token=token, local_files_only=local_only) for name in ADAPTER_FILES]

        try:
            paths = from_hub(repo_id, fetch)
        except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, EntryNotFoundError):
            raise APIError(404, f"the hub repo {repo_id} does not exist or cannot be read without a token",
                           param="lora_path", code="adapter_not_found") from None
        except APIError:
            raise
        except HubUnreachableError:  # its advice is the operator's, not the caller's
            raise APIError(503, f"the Hugging Face hub cannot be reached from this server and its cache does not "
                                f"hold {repo_id}; retry later", code="hub_unavailable") from None
        except Exception as exc:  # no network, a hub error: the hub, not the request, is at fault
            raise APIError(503, f"the Hugging Face hub could not be reached for {repo_id} ({type(exc).__name__}); "
                                "retry later", code="hub_unavailable") from None
        return Path(paths[0]).parent


async def _on_daemon_thread(fn, *args, timeout: float):
    """fn(*args) on a thread of its own, awaited up to `timeout` (asyncio.TimeoutError past it). A daemon
    thread, unlike asyncio.to_thread's pool, never holds up the server's exit if the hub hangs."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if not future.done():  # not timed out meanwhile
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # handed to the awaiting request
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop has closed: nobody waits any more
            pass

    threading.Thread(target=run, name="lorakit-hub-download", daemon=True).start()
    return await asyncio.wait_for(future, timeout)


def _check_text(lora_path: str) -> None:
    """400 for a lora_path no folder could have: empty, too long, a NUL byte, a `~user` form."""
    if not lora_path or len(lora_path) > MAX_PATH_CHARS:
        raise APIError(400, f"lora_path must hold 1 to {MAX_PATH_CHARS} characters", param="lora_path")
    if "\0" in lora_path:
        raise APIError(400, "lora_path must not hold a NUL character", param="lora_path")
    if lora_path.startswith("~"):
        raise APIError(400, "lora_path is not expanded (~ forms are refused); give a path under an adapter root",
                       param="lora_path")
