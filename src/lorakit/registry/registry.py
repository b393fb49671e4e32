"""`Registry`: immutable adapter versions, addressed by content digest, under names.

    registry = Registry.open("~/adapters")          # or Registry.open(): $LORAKIT_REGISTRY, else XDG data
    registry.add("runs/reverse")                     # Added(entry, "added" | "alias" | "unchanged")
    registry.resolve("reverse")                      # Entry of the latest version named "reverse"
    registry.get("reverse@1a2b3c4d")                 # Path of that version's folder, its files re-hashed
    registry.check()                                 # [Damage(...)] for every damaged version

Rules: a version is the adapter's content digest (`Adapter.digest`), checked by `Adapter.read` before it is
stored and never changed after; a stored version holds the adapter's two files and, when the folder has
them, its model card, signature, run files and vet report (SIDE_FILES). A folder holding a pickle file
anywhere is refused. `get` hashes every file again and refuses a version whose files differ from the
index (a file changed, missing or added), naming the file: a damaged version is never served.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Union

from lorakit.io.adapter import WEIGHTS_NAME, Adapter, a_few
from lorakit.io.adapter_config import CONFIG_NAME
from lorakit.io.safetensors_file import PICKLE_SUFFIXES
from lorakit.registry.entry import UNVETTED, Entry, RegistryError, short
from lorakit.registry.folder_copy import write_folder
from lorakit.registry.folder_storage import FolderStorage
from lorakit.registry.location import registry_path
from lorakit.registry.references import check_name, parse, pick
from lorakit.registry.storage import Storage

SIGNATURE = "model.sig"
VET_REPORT = "vet_report.json"
# stored beside the adapter when present: model card, signing card and signature, run files, vet report
SIDE_FILES = ("README.md", "lorakit_card.json", SIGNATURE, "train_config.json", "train_report.json", VET_REPORT)


@dataclass(frozen=True)
class Added:
    """What `add` did: "added" a new version, bound an existing one to another name ("alias"), or nothing
    ("unchanged": that name already had that version)."""

    entry: Entry
    outcome: str


@dataclass(frozen=True)
class Damage:
    """A stored version whose files differ from the index: each problem names a file."""

    digest: str
    names: tuple[str, ...]
    problems: tuple[str, ...]

    def __str__(self) -> str:
        label = ", ".join(self.names) or "not indexed"
        return f"{short(self.digest)} ({label}): {'; '.join(self.problems)}"


class Registry:
    """Adapter versions in a `Storage` (by default a folder with an SQLite index); see the module docstring."""

    def __init__(self, storage: Storage):
        self.storage = storage

    @classmethod
    def open(cls, path: Optional[Union[str, Path]] = None) -> "Registry":
        """The folder registry at `path` (created on first use), else at the default place (location.py)."""
        return cls(FolderStorage(registry_path(path)))

    # --- adding ---------------------------------------------------------------------------------------
    def add(self, folder: Union[str, Path], name: Optional[str] = None) -> Added:
        """Check the adapter in `folder` and store it as a version under `name` (default: the folder's name).

        The same version under the same name again changes nothing; under another name, it binds that name
        to the stored version (an alias) and stores nothing new. A damaged stored version is restored from
        `folder` when it holds the files the index records. Raises RegistryError or AdapterFileError.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise RegistryError(f"{folder}: no such adapter folder")
        refuse_pickles(folder)
        name = check_name(folder.resolve().name if name is None else name)
        files = {n: folder / n for n in (CONFIG_NAME, WEIGHTS_NAME) + SIDE_FILES if (folder / n).is_file()}
        hashes = {n: file_sha256(p) for n, p in files.items()}
        adapter = Adapter.read(folder, allow_hub=False)
        vetted = vet_verdict(files.get(VET_REPORT))
        digest = adapter.digest
        with self.storage.writing():
            bound = {e.name for e in self.storage.entries(name) if e.digest == digest}
            indexed = self.storage.version_files(digest)
            outcome = "unchanged" if bound else "alias" if indexed is not None else "added"
            if indexed is None:
                self._put(folder, digest, files, hashes)
                self.storage.record_version(digest, hashes, SIGNATURE in files, vetted,
                                            adapter.base.name if adapter.base else None)
            elif self._compare(digest, indexed):
                self._repair(folder, digest, files, hashes, indexed)
            if outcome != "unchanged":
                self.storage.record_name(name, digest, datetime.now(timezone.utc).isoformat(timespec="seconds"))
        return Added(self.resolve(f"{name}@{digest.removeprefix('sha256:')}"), outcome)

    def _put(self, folder: Path, digest: str, files: dict[str, Path], hashes: dict[str, str]) -> None:
        """Store the files, then hash the copies: a folder changed while it was read is not stored."""
        self.storage.put_files(digest, files)
        problems = self._compare(digest, hashes)
        if problems:
            self.storage.delete_files(digest)
            raise RegistryError(f"{folder} changed while it was added ({'; '.join(problems)}); add it again")

    def _repair(self, folder: Path, digest: str, files: dict[str, Path], hashes: dict[str, str],
                indexed: dict[str, str]) -> None:
        """Store a damaged version's files again from a folder holding exactly the files indexed."""
        if hashes != indexed:
            raise RegistryError(f"{short(digest)} is damaged in the registry at {self.storage.location} "
                                f"({'; '.join(self._compare(digest, indexed))}) and {folder} holds other card or "
                                "run files than it did, so it cannot restore it; remove the version and add it again")
        self._put(folder, digest, files, hashes)

    # --- reading --------------------------------------------------------------------------------------
    def entries(self, name: Optional[str] = None) -> list[Entry]:
        """Every (name, version) binding, or those of `name`, oldest first."""
        return self.storage.entries(name)

    def resolve(self, reference: str) -> Entry:
        """The entry `reference` names: `name` is its latest version, `name@<8+ hex digits>` pins one.
        Raises RegistryError (one line listing the candidates) for an unknown or ambiguous reference."""
        name, _ = parse(reference)
        return pick(reference, self.storage.entries(name) or self.storage.entries(), self.storage.location)

    def get(self, reference: str) -> Path:
        """The folder of the version `reference` names, after hashing every file against the index; raises
        RegistryError naming the files of a damaged version. The folder is the store's: read it, never write."""
        entry = self.resolve(reference)
        problems = self.damage(entry.digest)
        if problems:
            raise RegistryError(f"{entry.reference} is damaged in the registry at {self.storage.location}: "
                                f"{'; '.join(problems)}. It is not used; remove it (lorakit registry remove "
                                f"{entry.reference}) and add the adapter again")
        return self.storage.folder(entry.digest)

    def damage(self, digest: str) -> list[str]:
        """What differs between version `digest`'s stored files and the index ([] when intact)."""
        indexed = self.storage.version_files(digest)
        if indexed is None:
            return ["not in the index (files left by an interrupted add; adding the adapter again replaces them)"]
        return self._compare(digest, indexed)

    def _compare(self, digest: str, expected: dict[str, str]) -> list[str]:
        stored = self.storage.stored_files(digest)
        if stored is None:
            return [f"its folder {self.storage.folder(digest)} is missing"]
        problems = [f"{n} is missing" for n in sorted(set(expected) - set(stored))]
        problems += [f"{n} changed" for n in sorted(set(expected) & set(stored))
                     if file_sha256(stored[n]) != expected[n]]
        problems += [f"{n} was added" for n in sorted(set(stored) - set(expected))]
        return problems

    def check(self) -> list[Damage]:
        """Every damaged version (and stored files the index does not know), each problem naming a file."""
        names: dict[str, list[str]] = {}
        for entry in self.storage.entries():
            names.setdefault(entry.digest, []).append(entry.name)
        found = []
        for digest in sorted(set(names) | set(self.storage.stored_digests())):
            problems = self.damage(digest)
            if problems:
                found.append(Damage(digest, tuple(names.get(digest, ())), tuple(problems)))
        return found

    # --- removing and exporting -----------------------------------------------------------------------
    def remove(self, reference: str, all_versions: bool = False) -> list[Entry]:
        """Unbind the version `reference` names (with all_versions, every version of the name); a version's
        files are deleted when no name is left bound to it. Returns the entries removed."""
        if all_versions:
            name, prefix = parse(reference)
            if prefix is not None:
                raise RegistryError(f"--all removes every version of a name; give the name alone ({name})")
            targets = self.storage.entries(name) or [self.resolve(name)]
        else:
            targets = [self.resolve(reference)]
        with self.storage.writing():  # files go inside the lock: an add of the same digest cannot interleave
            for entry in targets:
                if self.storage.forget(entry.name, entry.digest):
                    self.storage.delete_files(entry.digest)
        return targets

    def export(self, reference: str, dest: Union[str, Path]) -> Path:
        """Write the version `reference` names (checked as `get` checks it) as a plain adapter folder `dest`
        (which must not exist, or be empty): the adapter files with its card, signature and run files."""
        dest = Path(dest)
        if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
            raise RegistryError(f"{dest} exists and is not an empty folder; export writes a new folder")
        folder = self.get(reference)
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_folder({p.name: p for p in sorted(folder.iterdir())}, dest)
        return dest


def refuse_pickles(folder: Path) -> None:
    """Refuse a folder holding a pickle file anywhere in it: it would travel with the adapter, and pickle
    files run arbitrary code when loaded."""
    pickles = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise RegistryError(f"{folder} holds pickle files ({a_few(pickles)}), which can run arbitrary code when "
                            "loaded; the registry stores safetensors adapters only. Remove them and add it again")


def vet_verdict(report: Optional[Path]) -> str:
    """The `verdict` string of a vet report (vet_report.json), or "unvetted" when there is none."""
    if report is None:
        return UNVETTED
    try:
        verdict = json.loads(report.read_text(encoding="utf-8")).get("verdict")
    except (ValueError, UnicodeDecodeError, AttributeError):
        verdict = None
    if not isinstance(verdict, str) or not verdict:
        raise RegistryError(f"{report}: a vet report must be a JSON object with a \"verdict\" string")
    return verdict


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file's bytes, read in chunks."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
