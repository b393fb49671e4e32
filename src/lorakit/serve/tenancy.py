"""Which adapters each tenant may see, use and manage.

The base model and the adapters given at start-up (`--adapter`): a key sees those its `models` list names
("*": all of them). An adapter loaded at run time belongs to the tenant that loaded it: only that tenant
and admins see it, whatever another key's `models` list says. Seeing is all or nothing: for a name a
tenant may not see, every answer (use, unload, replace) is the same 404, word for word, as for a name
that does not exist; /v1/models leaves it out and /metrics counts it as "runtime", never by name.

Only an admin may unload or replace a start-up adapter; only its owner or an admin a runtime one. Adapter
names are one namespace: loading under a name that is taken, or that another load is claiming, is a 409
whoever holds it, which tells the caller that the name is taken and nothing else (not whose it is, nor
what it serves).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from lorakit.engine import Engine
from lorakit.engine.adapter_cache import AdapterInfo
from lorakit.errors import UnknownModelError
from lorakit.serve.auth import Tenant
from lorakit.serve.error_responses import APIError

RUNTIME_LABEL = "runtime"  # the metrics label of every runtime-loaded adapter


class Tenancy:
    """Owners of the runtime-loaded adapters and the names being loaded; used from the event loop only."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.owners: dict[str, str] = {}  # runtime-loaded adapter -> its tenant (set when its first load begins)
        self.loading: set[str] = set()

    def sees(self, tenant: Tenant, name: str) -> bool:
        owner = self.owners.get(name)
        if owner is not None:
            return tenant.admin or owner == tenant.name
        return tenant.may_use(name)

    def find(self, tenant: Tenant, name: str, param: str = "model") -> Optional[AdapterInfo]:
        """The adapter `name` selects for `tenant` (None: the base model); the one 404 if it may not see it."""
        try:
            info = self.engine.adapter(name)
        except UnknownModelError:
            raise unknown_model(name, param) from None
        if not self.sees(tenant, name):
            raise unknown_model(name, param)
        return info

    def label(self, name: str) -> str:
        """How /metrics names requests for `name`: start-up adapters and the base model by name."""
        return RUNTIME_LABEL if name in self.owners else name

    @contextmanager
    def load(self, tenant: Tenant, name: str, replace: bool) -> Iterator[None]:
        """Hold `name` for one load by `tenant` while the body runs; refuses with the API's answer otherwise.
        A new name is owned by `tenant` from the start, so nobody else sees it half-loaded."""
        self._not_base(name)
        if replace:
            self.find(tenant, name, "lora_name")
        if name in self.loading or (not replace and self._exists(name)):
            raise APIError(409, f"an adapter named {name!r} is already loaded or being loaded; choose another name, "
                                "or pass load_inplace=true to replace your own", param="lora_name",
                           code="adapter_name_taken")
        if replace:
            self._may_manage(tenant, name)
        new = not replace
        self.loading.add(name)
        if new:
            self.owners[name] = tenant.name
        try:
            yield
        except BaseException:
            if new:
                self.owners.pop(name, None)
            raise
        finally:
            self.loading.discard(name)

    def unload(self, tenant: Tenant, name: str) -> None:
        self._not_base(name)
        self.find(tenant, name, "lora_name")
        if name in self.loading:
            raise APIError(409, f"the adapter {name!r} is being loaded; unload it when that has finished",
                           param="lora_name", code="adapter_busy")
        self._may_manage(tenant, name)
        self.engine.remove_adapter(name)
        self.owners.pop(name, None)

    def _exists(self, name: str) -> bool:
        try:
            self.engine.adapter(name)
        except UnknownModelError:
            return False
        return True

    def _not_base(self, name: str) -> None:
        if name == self.engine.model_name:
            raise APIError(400, f"{name!r} is the base model's name; only adapters can be loaded or unloaded",
                           param="lora_name")

    def _may_manage(self, tenant: Tenant, name: str) -> None:
        """After `find`: the tenant sees the adapter; owners and admins may change it."""
        if not (tenant.admin or self.owners.get(name) == tenant.name):
            raise APIError(403, f"only an admin may unload or replace {name!r}, an adapter given at start-up",
                           param="lora_name", code="adapter_not_owned")


def unknown_model(name: str, param: str = "model") -> APIError:
    """The answer for a name that does not exist and for one the caller may not see alike."""
    return APIError(404, f"the model {name!r} does not exist: it is neither the base model nor a loaded adapter "
                         "(GET /v1/models lists them)", param=param, code="model_not_found")
