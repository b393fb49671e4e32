"""What the registry says about one stored version: `Entry`, and the registry's error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from lorakit.errors import LorakitError

UNVETTED = "unvetted"


class RegistryError(LorakitError, ValueError):
    """A registry reference, store or operation is wrong: unknown or ambiguous names, damaged entries."""


@dataclass(frozen=True)
class Entry:
    """One name bound to one immutable version.

    name      the name it was added under (a version may carry several names: aliases)
    digest    "sha256:..." the adapter's content digest (`Adapter.digest`): the version's identity
    added_at  when this name was bound to this version (UTC, ISO 8601)
    files     {file name: sha256 hex} of every stored file, as indexed when the version was added
    signed    whether the version holds a signature (model.sig)
    vetted    the vet report's verdict, or "unvetted" when the version holds no vet report
    base      the base model the adapter records (its name), or None
    """

    name: str
    digest: str
    added_at: str
    files: Mapping[str, str]
    signed: bool
    vetted: str
    base: Optional[str]

    @property
    def short_digest(self) -> str:
        return short(self.digest)

    @property
    def reference(self) -> str:
        """`name@<12 hex>`: a reference that pins this version."""
        return f"{self.name}@{self.short_digest}"

    def to_json(self) -> dict:
        return {"name": self.name, "digest": self.digest, "added_at": self.added_at, "signed": self.signed,
                "vetted": self.vetted, "base": self.base, "files": dict(self.files)}


def short(digest: str) -> str:
    """The first 12 hex digits of a "sha256:..." digest: how lists and messages show a version."""
    return digest.removeprefix("sha256:")[:12]
