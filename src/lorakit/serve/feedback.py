"""Feedback on served completions, in SQLite: which alias and variant served each completion id, and the
scores and preferences callers send back for them (POST /v1/feedback).

    completions(id, tenant, model, served, alias, variant, created)   one row per completion the server sent
    feedback(id, tenant, score, preferred, against, created)          the latest feedback on each completion

`served` is what the `x-lorakit-adapter` header said; `alias`/`variant` are set when the request named an
alias. A preference between two answers (the playground's vote) is two rows: the preferred completion
with preferred = 1 and `against` the other, and the other with preferred = 0. Feedback is accepted only
from the tenant the completion was served to; a completion id another tenant got is unknown to the caller.

Where it lives: `--feedback-db PATH`, else `feedback.sqlite` in the `--registry` folder, else
`$XDG_DATA_HOME/lorakit/feedback.sqlite` (~/.local/share/lorakit/). WAL mode: readers never wait for the
server's writes, and several servers may share one file.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from lorakit.errors import ConfigError

FILE_NAME = "feedback.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, model TEXT NOT NULL,
    served TEXT NOT NULL, alias TEXT, variant TEXT, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS completions_alias ON completions (alias, variant);
CREATE TABLE IF NOT EXISTS feedback (id TEXT PRIMARY KEY REFERENCES completions (id), tenant TEXT NOT NULL,
    score REAL, preferred INTEGER, against TEXT, created REAL NOT NULL);
"""


def feedback_path(explicit: Optional[str], registry_folder: Optional[Union[str, Path]]) -> Path:
    """Where the store lives (see the module docstring)."""
    if explicit:
        return Path(explicit).expanduser()
    if registry_folder is not None:
        return Path(registry_folder) / FILE_NAME
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "lorakit" / FILE_NAME


@dataclass(frozen=True)
class Served:
    """What served one completion, as recorded."""

    id: str
    tenant: str
    served: str
    alias: Optional[str]
    variant: Optional[str]


@dataclass(frozen=True)
class Evidence:
    """One variant's feedback: its completions, scores and preferences."""

    completions: int
    scores: list[float]
    wins: int
    votes: int


class FeedbackStore:
    """The SQLite file; one connection, used from the server's event loop (each call is one short statement)."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"--feedback-db {self.path}: cannot open a feedback database there ({exc})") from None

    def record(self, id: str, tenant: str, model: str, served: str, alias: Optional[str] = None,
               variant: Optional[str] = None) -> None:
        self.db.execute("INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (id, tenant, model, served, alias, variant, time.time()))

    def served(self, id: str, tenant: str) -> Optional[Served]:
        """The completion `id` as served to `tenant` (None: unknown, or another tenant's)."""
        row = self.db.execute("SELECT id, tenant, served, alias, variant FROM completions WHERE id = ? AND tenant = ?",
                              (id, tenant)).fetchone()
        return Served(*row) if row else None

    def add(self, id: str, tenant: str, score: Optional[float] = None, preferred: Optional[bool] = None,
            against: Optional[str] = None) -> None:
        """Feedback on a completion (replacing earlier feedback on it); with `against`, the other one loses."""
        now = time.time()
        rows = [(id, tenant, score, None if preferred is None else int(preferred), against, now)]
        if against is not None:
            rows.append((against, tenant, None, int(not preferred), id, now))
        with self.db:  # one transaction: a vote is both rows or neither
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO feedback VALUES (?, ?, ?, ?, ?, ?)", rows)

    def evidence(self, alias: str, variant: str) -> Evidence:
        completions = self.db.execute("SELECT count(*) FROM completions WHERE alias = ? AND variant = ?",
                                      (alias, variant)).fetchone()[0]
        rows = self.db.execute("SELECT f.score, f.preferred FROM feedback f JOIN completions c ON c.id = f.id "
                               "WHERE c.alias = ? AND c.variant = ?", (alias, variant)).fetchall()
        scores = [score for score, _ in rows if score is not None]
        votes = [preferred for _, preferred in rows if preferred is not None]
        return Evidence(completions, scores, sum(votes), len(votes))

    def pairs(self, tenant: Optional[str]) -> list[tuple[str, str, int]]:
        """(winner's server, loser's server, votes) over head-to-head votes (`tenant`'s, or everyone's: None)."""
        return self.db.execute(
            "SELECT w.served, l.served, count(*) FROM feedback f JOIN completions w ON w.id = f.id "
            "JOIN completions l ON l.id = f.against WHERE f.preferred = 1 AND (? IS NULL OR f.tenant = ?) "
            "GROUP BY w.served, l.served", (tenant, tenant)).fetchall()

    def close(self) -> None:
        self.db.close()
