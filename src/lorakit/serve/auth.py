"""Who may call the server: API keys, each naming a tenant, the models it may use, whether it may
load and unload adapters, and how much of the engine it may hold.

`--api-key K` is one key with full access (an admin). `--api-keys FILE` is a YAML or JSON mapping:

    sk-team-a:                     # the key itself, or "sha256:<hex digest of the key>"
      tenant: team-a
      models: [lorakit-embedded, reverse]     # or "*": the base model and every start-up adapter
      can_load_adapters: false     # may load adapters at run time, where the server allows it
      admin: false                 # sees and manages every adapter, whoever loaded it
      max_running: 4               # this tenant's sequences decoded at once (default: no limit)
      max_queued: 16               # this tenant's requests waiting; past it 429 (default: no limit)

`models` covers the base model and the adapters given at start-up; an adapter loaded at run time belongs
to the tenant that loaded it, and only that tenant and admins see it (serve/tenancy.py). Keys that name
the same tenant share its adapters and its quotas.

Requests carry `Authorization: Bearer <key>`. The server keeps only each key's SHA-256 and compares
digests with `hmac.compare_digest` against every entry, so the time taken depends neither on how much of
a key matched nor on its length. With neither flag there is no authentication and every caller is one anonymous admin tenant.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import yaml

from lorakit.errors import ConfigError


@dataclass(frozen=True)
class Tenant:
    """What one API key may do. models: the base model and start-up adapters it may use, or "*" for all;
    max_running / max_queued: its share of the engine (None: no limit of its own)."""

    name: str
    models: Union[str, frozenset[str]] = "*"
    can_load_adapters: bool = False
    admin: bool = False
    max_running: Optional[int] = None
    max_queued: Optional[int] = None

    def may_use(self, model: str) -> bool:
        """By the models list alone: for the base model and start-up adapters (see serve/tenancy.py)."""
        return self.admin or self.models == "*" or model in self.models

    @property
    def may_load(self) -> bool:
        return self.admin or self.can_load_adapters


OPEN_ACCESS = Tenant("anonymous", "*", can_load_adapters=True, admin=True)
FIELDS = ("tenant", "models", "can_load_adapters", "admin", "max_running", "max_queued")


class KeyRing:
    """The accepted keys. `tenant_for(header)` -> the caller's Tenant, or None for a missing/invalid key."""

    def __init__(self, entries: Optional[list[tuple[str, Tenant]]]):
        """entries: (key, or "sha256:<hex>" of it; tenant) pairs; None: no authentication."""
        self._digests = None if entries is None else [(_digest(key), tenant) for key, tenant in entries]

    @property
    def required(self) -> bool:
        return self._digests is not None

    @classmethod
    def open(cls) -> "KeyRing":
        return cls(None)

    @classmethod
    def single(cls, key: str) -> "KeyRing":
        if not key:
            raise ConfigError("--api-key is empty")
        return cls([(key, Tenant("default", "*", can_load_adapters=True, admin=True))])

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "KeyRing":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read the API keys file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            first_line = str(exc).splitlines()[0]
            raise ConfigError(f"the API keys file {path} is not valid YAML or JSON: {first_line}") from None
        if not isinstance(data, dict) or not data:
            raise ConfigError(f"the API keys file {path} must map each key to {{{', '.join(FIELDS)}}}")
        return cls([(str(key), _tenant(path, str(key), entry)) for key, entry in data.items()])

    def tenant_for(self, authorization: Optional[str]) -> Optional[Tenant]:
        if self._digests is None:
            return OPEN_ACCESS
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        presented = hashlib.sha256(key.strip().encode()).digest()
        found = None
        for digest, tenant in self._digests:  # no early exit: every entry costs the same
            if hmac.compare_digest(presented, digest) and found is None:
                found = tenant
        return found


def _digest(key: str) -> bytes:
    if key.startswith("sha256:"):
        return bytes.fromhex(key[len("sha256:"):])
    return hashlib.sha256(key.encode()).digest()


def _tenant(path: Path, key: str, entry) -> Tenant:
    shown = "sha256:..." if key.startswith("sha256:") else f"{key[:4]}..."  # never print a whole key
    where = f"{path}: the entry for key {shown}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a mapping with the fields {', '.join(FIELDS)}")
    unknown = set(entry) - set(FIELDS)
    if unknown:
        raise ConfigError(f"{where} has unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
                          f"the fields are {', '.join(FIELDS)}")
    if key.startswith("sha256:"):
        digest = key[len("sha256:"):]
        if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise ConfigError(f"{where}: a sha256: key must be followed by 64 hex digits")
    tenant = entry.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        raise ConfigError(f"{where} needs a tenant name (tenant: ...)")
    models = entry.get("models", "*")
    if models != "*" and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
        raise ConfigError(f"{where}: models must be \"*\" or a list of model names")
    for flag in ("can_load_adapters", "admin"):
        if not isinstance(entry.get(flag, False), bool):
            raise ConfigError(f"{where}: {flag} must be true or false")
    for quota in ("max_running", "max_queued"):
        value = entry.get(quota)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{where}: {quota} must be a whole number >= 1 (or left out: no limit)")
    return Tenant(tenant, "*" if models == "*" else frozenset(models), entry.get("can_load_adapters", False),
                  entry.get("admin", False), entry.get("max_running"), entry.get("max_queued"))
