"""The seam between the registry's rules and where versions are kept: `Storage`.

`Registry` (registry.py) decides what may be stored and what a reference means; a `Storage` keeps the
files of each version (addressed by digest) and the index of names, versions and file hashes. The
default is `FolderStorage` (folder_storage.py): a folder plus an SQLite index. An object store follows by
implementing the same methods (files in a bucket, `folder` downloading to a local cache).

Every change runs inside `writing()`, which lets one writer at a time in, so that checking the index and
changing it are one step for concurrent processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import ContextManager, Mapping, Optional, Protocol

from lorakit.registry.entry import Entry


class Storage(Protocol):
    location: str  # how messages name this store (a folder path, a bucket URL)

    # --- files ----------------------------------------------------------------------------------------
    def put_files(self, digest: str, files: Mapping[str, Path]) -> None:
        """Store `files` ({stored name: source path}) as version `digest`, all or nothing."""

    def folder(self, digest: str) -> Path:
        """A local folder holding version `digest`'s stored files, for reading only."""

    def stored_files(self, digest: str) -> Optional[dict[str, Path]]:
        """{name: path} of the files version `digest` holds now, None when it has no files at all."""

    def stored_digests(self) -> list[str]:
        """Every version with files in the store, indexed or not."""

    def delete_files(self, digest: str) -> None:
        """Remove version `digest`'s files (nothing when it has none)."""

    # --- index ----------------------------------------------------------------------------------------
    def writing(self) -> ContextManager[None]:
        """Hold the store's one writer lock for the block; the index changes made in it commit together."""

    def entries(self, name: Optional[str] = None) -> list[Entry]:
        """Every (name, version) binding, or those of `name`, oldest first."""

    def version_files(self, digest: str) -> Optional[dict[str, str]]:
        """{file name: sha256 hex} the index holds for version `digest`, None when it is not indexed."""

    def record_version(self, digest: str, files: Mapping[str, str], signed: bool, vetted: str,
                       base: Optional[str]) -> None:
        """Index version `digest` (not yet bound to a name)."""

    def record_name(self, name: str, digest: str, added_at: str) -> None:
        """Bind `name` to the indexed version `digest`."""

    def forget(self, name: str, digest: str) -> bool:
        """Unbind `name` from `digest`, and drop the version from the index when no name is left bound
        to it; True when the version was dropped (its files are then the caller's to delete)."""
