"""References to registry versions: `name` (its latest version) or `name@<digest prefix>` (one version).

A prefix is at least 8 hex digits of the version's content digest (a leading "sha256:" is allowed) and
must match exactly one version of the name. Unknown and ambiguous references are one line naming the
candidates, so the user can copy the right one.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from lorakit.io.adapter import a_few
from lorakit.registry.entry import Entry, RegistryError, short

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MIN_PREFIX = 8


def check_name(name: str) -> str:
    """`name` if it can name a version (letters, digits, `.`, `_`, `-`; at most 128), else RegistryError."""
    if not NAME.fullmatch(name):
        raise RegistryError(f"{name!r} cannot name an adapter in the registry: use letters, digits, '.', '_' and "
                            "'-' (at most 128, starting with a letter or digit)")
    return name


def parse(reference: str) -> tuple[str, Optional[str]]:
    """(name, hex prefix or None) of `name` or `name@prefix`."""
    name, at, prefix = reference.partition("@")
    check_name(name)
    if not at:
        return name, None
    prefix = prefix.removeprefix("sha256:").lower()
    if len(prefix) < MIN_PREFIX or not re.fullmatch(r"[0-9a-f]+", prefix):
        raise RegistryError(f"{reference!r}: a version is at least {MIN_PREFIX} hex digits of its digest, as in "
                            f"{name}@1a2b3c4d")
    return name, prefix


def pick(reference: str, entries: Sequence[Entry], location: str) -> Entry:
    """The entry `reference` names among `entries` (all the registry's entries, oldest first)."""
    name, prefix = parse(reference)
    versions = [e for e in entries if e.name == name]
    if not versions:
        names = sorted({e.name for e in entries})
        known = f"its names: {a_few(names, 8)}" if names else "it is empty"
        raise RegistryError(f"no adapter named {name!r} in the registry at {location} ({known})")
    if prefix is None:
        return versions[-1]
    found = [e for e in versions if e.digest.removeprefix("sha256:").startswith(prefix)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise RegistryError(f"no version of {name!r} starts with {prefix}; its versions: "
                            f"{a_few([e.reference for e in versions], 8)}")
    raise RegistryError(f"{reference!r} matches {len(found)} versions ({a_few([e.digest for e in found], 8)}); "
                        "give more of the digest")


__all__ = ["check_name", "parse", "pick", "short"]
