"""Aliases: one model name split between adapter versions by weight, sticky per user (A/B tests, canaries).

    lorakit serve --alias support=support-v1:90,support-v2:10
    POST   /v1/aliases {"alias": "support", "targets": {"support-v1": 90, "support-v2": 10}}   create or re-weight
    DELETE /v1/aliases/support
    GET    /v1/aliases

A request for `model: "support"` is served by one variant. `choose_variant` hashes the alias with the
request's `user` field (else the API key it came with): u = SHA-256(alias, key) read as a number in [0, 1),
and the variant is the first whose cumulative weight share exceeds u. A user therefore stays on one
variant while the weights stand, and moving weight from one variant to the next moves only the users in
the slice that changed hands. A request with neither a user nor a key is assigned at random by weight.

Changing an alias replaces its Alias value at once, so new requests see the new weights; a request
already admitted keeps the adapter it was given, and the engine keeps that adapter resident while any
request uses it. Targets are adapter names the server serves; where the server has a registry, a target may
also be a registry reference (`name@<digest prefix>`), standing for the served adapter of that version.

Ownership follows the adapters' rules (serve/tenancy.py): a start-up alias (`--alias`) is seen by keys whose
`models` list names it (or "*"), and only admins change it; a runtime alias belongs to the tenant that made
it (keys with can_load_adapters), and only it and admins see or change it. For every other tenant it does not
exist: the same 404 as for an unknown name. Alias and adapter names are one namespace.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Optional

from lorakit.engine.routing import ROUTE_MODEL
from lorakit.errors import ConfigError
from lorakit.serve.auth import Tenant
from lorakit.serve.error_responses import APIError

MAX_TARGETS = 16
RUNTIME_LABEL = "runtime"  # the metrics label of every runtime-created alias (as for runtime adapters)


@dataclass(frozen=True)
class Alias:
    name: str
    targets: tuple[tuple[str, float], ...]  # (adapter name, weight), in the order given
    owner: Optional[str] = None  # the tenant that created it at run time; None: given at start-up

    def to_json(self) -> dict:
        total = sum(w for _, w in self.targets)
        return {"alias": self.name, "targets": {name: weight for name, weight in self.targets},
                "shares": {name: weight / total for name, weight in self.targets},
                "owner": "startup" if self.owner is None else "runtime"}


def sticky_point(alias: str, key: str) -> float:
    """A stable number in [0, 1) for (alias, key): the same user lands at the same point every time."""
    digest = hashlib.sha256(f"{alias}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_variant(alias: Alias, key: Optional[str]) -> str:
    """The variant that serves `key` (the request's user, else its API key; None: by weight at random)."""
    total = sum(weight for _, weight in alias.targets)
    point = (sticky_point(alias.name, key) if key is not None else random.random()) * total
    for name, weight in alias.targets:
        if point < weight:
            return name
        point -= weight
    return next(name for name, weight in reversed(alias.targets) if weight > 0)  # rounding at the very top


def check_targets(targets: dict[str, float], shown: str) -> tuple[tuple[str, float], ...]:
    """Weights >= 0, at least one > 0, 1 to MAX_TARGETS targets; a ValueError naming `shown` otherwise."""
    if not 1 <= len(targets) <= MAX_TARGETS:
        raise ValueError(f"{shown}: an alias has 1 to {MAX_TARGETS} targets, got {len(targets)}")
    for name, weight in targets.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= weight < float("inf"):
            raise ValueError(f"{shown}: the weight of {name!r} must be a number >= 0, got {weight!r}")
    if not any(weight > 0 for weight in targets.values()):
        raise ValueError(f"{shown}: at least one target needs a weight > 0")
    return tuple((name, float(weight)) for name, weight in targets.items())


def parse_alias_flag(value: str) -> tuple[str, dict[str, float]]:
    """'support=support-v1:90,support-v2:10' -> ("support", {"support-v1": 90.0, "support-v2": 10.0})."""
    usage = f"--alias takes NAME=ADAPTER:WEIGHT,ADAPTER:WEIGHT (e.g. support=support-v1:90,support-v2:10), got {value!r}"
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
        raise ConfigError(usage)
    if name == ROUTE_MODEL:
        raise ConfigError(f"--alias {name}: the model name {name!r} asks for routing by prompt; choose another name")
    targets = {}
    for part in rest.split(","):
        target, sep, weight = part.rpartition(":")
        try:
            targets[target] = float(weight)
        except ValueError:
            raise ConfigError(usage) from None
        if not sep or not target:
            raise ConfigError(usage)
    try:
        check_targets(targets, f"--alias {name}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return name, targets


class AliasTable:
    """The server's aliases and who owns them; used from the event loop only."""

    def __init__(self):
        self.aliases: dict[str, Alias] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.aliases

    def sees(self, tenant: Tenant, alias: Alias) -> bool:
        if alias.owner is not None:
            return tenant.admin or alias.owner == tenant.name
        return tenant.may_use(alias.name)

    def find(self, tenant: Tenant, name: str, param: str = "alias") -> Alias:
        alias = self.aliases.get(name)
        if alias is None or not self.sees(tenant, alias):
            raise unknown_alias(name, param)
        return alias

    def visible(self, tenant: Tenant) -> list[Alias]:
        return [alias for alias in self.aliases.values() if self.sees(tenant, alias)]

    def label(self, alias: Alias) -> str:
        """How /metrics names requests for `alias`: start-up aliases by name, runtime ones as "runtime"."""
        return alias.name if alias.owner is None else RUNTIME_LABEL

    def put(self, tenant: Tenant, name: str, targets: tuple[tuple[str, float], ...]) -> tuple[Alias, bool]:
        """Create `name` for `tenant` or re-weight it (if it may change it): (the alias, whether it is new)."""
        old = self.aliases.get(name)
        if old is not None and not self.sees(tenant, old):
            raise name_taken(name)
        if old is not None:
            self._may_change(tenant, old)
        alias = Alias(name, targets, tenant.name if old is None else old.owner)
        self.aliases[name] = alias  # one assignment: new requests see the new weights at once
        return alias, old is None

    def start_up(self, name: str, targets: tuple[tuple[str, float], ...]) -> None:
        self.aliases[name] = Alias(name, targets)

    def delete(self, tenant: Tenant, name: str) -> None:
        self._may_change(tenant, self.find(tenant, name))
        del self.aliases[name]

    def _may_change(self, tenant: Tenant, alias: Alias) -> None:
        if not (tenant.admin or (alias.owner is not None and alias.owner == tenant.name)):
            raise APIError(403, f"only an admin may change or delete {alias.name!r}, an alias given at start-up",
                           param="alias", code="alias_not_owned")


def name_taken(name: str, param: str = "alias") -> APIError:
    return APIError(409, f"the name {name!r} is taken by an adapter or an alias; choose another", param=param,
                    code="alias_name_taken")


def unknown_alias(name: str, param: str = "alias") -> APIError:
    return APIError(404, f"the alias {name!r} does not exist (GET /v1/aliases lists them)", param=param,
                    code="alias_not_found")
