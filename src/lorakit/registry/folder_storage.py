"""`FolderStorage`: registry versions in a folder, indexed in SQLite.

    REGISTRY/
      index.sqlite                 the index (WAL mode; schema below)
      versions/<sha256 hex>/       one folder per version, named by the adapter's content digest,
        adapter_config.json        its files read-only; a version is never changed once stored
        adapter_model.safetensors
        README.md ...              model card, signature, run files, vet report, when the adapter had them
      versions/.incoming-*/        a version being copied in (renamed into place when complete)

A version is copied into a temporary folder beside `versions/<hex>`, every file and the folder fsynced,
then renamed into place: a crash leaves either nothing or the whole version, never part of one. Writers
take SQLite's write lock (BEGIN IMMEDIATE) for the whole of a change, so two processes adding at once
take turns; readers never wait for them (WAL).

The index schema (SQLite, `PRAGMA user_version` = 1):

    versions(digest TEXT PRIMARY KEY, signed INTEGER, vetted TEXT, base TEXT)
    files(digest TEXT, name TEXT, sha256 TEXT, PRIMARY KEY (digest, name))
    names(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT, digest TEXT, added_at TEXT, UNIQUE (name, digest))

`names.id` orders a name's versions: the latest is the one bound last.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Mapping, Optional

from lorakit.registry.entry import Entry, RegistryError
from lorakit.registry.folder_copy import write_folder

INDEX_NAME = "index.sqlite"
VERSIONS = "versions"
BUSY_TIMEOUT_MS = 60_000  # how long a writer waits for another's change (copying a big adapter) to finish
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (digest TEXT PRIMARY KEY, signed INTEGER NOT NULL, vetted TEXT NOT NULL,
                                     base TEXT);
CREATE TABLE IF NOT EXISTS files (digest TEXT NOT NULL REFERENCES versions (digest) ON DELETE CASCADE,
                                  name TEXT NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY (digest, name));
CREATE TABLE IF NOT EXISTS names (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
                                  digest TEXT NOT NULL REFERENCES versions (digest), added_at TEXT NOT NULL,
                                  UNIQUE (name, digest));
"""


class FolderStorage:
    """A registry folder (created on first use) and its SQLite index; see the module docstring."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.location = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"{self.root} exists and is not a folder; a registry is a folder")
        (self.root / VERSIONS).mkdir(parents=True, exist_ok=True)
        self._local = threading.local()  # one sqlite3 connection per thread
        if self._schema_version() != SCHEMA_VERSION:  # a new index: create it (readers never take the lock)
            with self.writing():
                if self._schema_version() == 0:
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if self._schema_version() > SCHEMA_VERSION:
            raise RegistryError(f"{self.root / INDEX_NAME} was written by a newer lorakit; upgrade lorakit")

    def _schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    @property
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(self.root / INDEX_NAME, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
                db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA foreign_keys = ON")
            except sqlite3.DatabaseError as exc:
                raise RegistryError(f"{self.root / INDEX_NAME}: not a usable registry index ({exc})") from None
            self._local.db = db
        return db

    # --- files ----------------------------------------------------------------------------------------
    def _version_dir(self, digest: str) -> Path:
        return self.root / VERSIONS / digest.removeprefix("sha256:")

    def put_files(self, digest: str, files: Mapping[str, Path]) -> None:
        target = self._version_dir(digest)
        if target.exists():  # files left by an add that died before indexing them: not a version
            _discard(target)
        write_folder(files, target, file_mode=0o444)  # read-only: a stored version is never edited in place

    def folder(self, digest: str) -> Path:
        return self._version_dir(digest)

    def stored_files(self, digest: str) -> Optional[dict[str, Path]]:
        folder = self._version_dir(digest)
        if not folder.is_dir():
            return None
        return {p.name: p for p in sorted(folder.iterdir())}

    def stored_digests(self) -> list[str]:
        return sorted("sha256:" + p.name for p in (self.root / VERSIONS).iterdir()
                      if p.is_dir() and not p.name.startswith("."))

    def delete_files(self, digest: str) -> None:
        if self._version_dir(digest).exists():
            _discard(self._version_dir(digest))

    # --- index ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")  # the write lock, taken before reading what the change depends on
        except sqlite3.OperationalError as exc:
            raise RegistryError(f"{self.root / INDEX_NAME}: another process held the registry for over "
                                f"{BUSY_TIMEOUT_MS // 1000} s ({exc}); try again") from None
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def entries(self, name: Optional[str] = None) -> list[Entry]:
        where, args = ("WHERE n.name = ?", (name,)) if name is not None else ("", ())
        rows = self._db.execute(f"SELECT n.name, n.digest, n.added_at, v.signed, v.vetted, v.base FROM names n "
                                f"JOIN versions v ON v.digest = n.digest {where} ORDER BY n.id", args).fetchall()
        files: dict[str, dict[str, str]] = {}
        for digest, file, sha in self._db.execute("SELECT digest, name, sha256 FROM files ORDER BY name"):
            files.setdefault(digest, {})[file] = sha
        return [Entry(name, digest, added_at, files.get(digest, {}), bool(signed), vetted, base)
                for name, digest, added_at, signed, vetted, base in rows]

    def version_files(self, digest: str) -> Optional[dict[str, str]]:
        if self._db.execute("SELECT 1 FROM versions WHERE digest = ?", (digest,)).fetchone() is None:
            return None
        return dict(self._db.execute("SELECT name, sha256 FROM files WHERE digest = ? ORDER BY name", (digest,)))

    def record_version(self, digest: str, files: Mapping[str, str], signed: bool, vetted: str,
                       base: Optional[str]) -> None:
        self._db.execute("INSERT INTO versions (digest, signed, vetted, base) VALUES (?, ?, ?, ?)",
                         (digest, int(signed), vetted, base))
        self._db.executemany("INSERT INTO files (digest, name, sha256) VALUES (?, ?, ?)",
                             [(digest, name, sha) for name, sha in files.items()])

    def record_name(self, name: str, digest: str, added_at: str) -> None:
        self._db.execute("INSERT INTO names (name, digest, added_at) VALUES (?, ?, ?)", (name, digest, added_at))

    def forget(self, name: str, digest: str) -> bool:
        self._db.execute("DELETE FROM names WHERE name = ? AND digest = ?", (name, digest))
        if self._db.execute("SELECT 1 FROM names WHERE digest = ?", (digest,)).fetchone() is not None:
            return False
        self._db.execute("DELETE FROM versions WHERE digest = ?", (digest,))
        return True


def _discard(folder: Path) -> None:
    """Remove a version folder: renamed aside first, so no reader ever sees it half deleted."""
    aside = Path(tempfile.mkdtemp(prefix=".removing-", dir=folder.parent))
    os.rename(folder, aside / "version")
    shutil.rmtree(aside)  # unlinking needs the folder's permission, not the read-only files' own
