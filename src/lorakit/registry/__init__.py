"""The adapter registry: immutable adapter versions, addressed by content digest, under names.

    registry.py        `Registry`: add (checked, pickle-free), resolve, get (re-hashed), check, remove, export
    references.py      `name` (the latest version) and `name@<digest prefix>` (one version)
    entry.py           `Entry` (one name bound to one version) and `RegistryError`
    storage.py         `Storage`: the seam where an object store can follow
    folder_storage.py  `FolderStorage`: a folder of versions and an SQLite index (the default)
    folder_copy.py     copying a folder so that it appears whole or not at all
    location.py        the default registry folder ($LORAKIT_REGISTRY, else the XDG data directory)

The command line is `lorakit registry ...` (cli/registry.py); the layout and guarantees: docs/registry.md.
"""

from lorakit.registry.entry import Entry, RegistryError
from lorakit.registry.registry import Added, Damage, Registry

__all__ = ["Added", "Damage", "Entry", "Registry", "RegistryError"]
