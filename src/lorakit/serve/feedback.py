"""Feedback on served completions, in SQLite: which alias, variant and adapter version served each
completion id, the scores and preferences callers send back for them (POST /v1/feedback), and the results
of `lorakit eval` (the leaderboard's other half: serve/leaderboard.py).

    completions(id, tenant, model, served, alias, variant, created, version)   one row per completion sent
    feedback(id, tenant, score, preferred, against, created)                   the latest feedback on each
    evals(run, version, name, task, metric, value, examples, base, data, data_sha256, created)
                                                                               one row per metric of an eval

`served` is what the `x-lorakit-adapter` header said; `alias`/`variant` are set when the request named an
alias; `version` is the adapter version that served it: its content digest (`Adapter.digest`, what the
registry calls a version), `base:<model>` for the base model, NULL for a mixture (and for completions
recorded before the column existed). A preference between two answers (the playground's vote) is two
rows: the preferred completion with preferred = 1 and `against` the other, and the other with
preferred = 0. Feedback is accepted only from the tenant the completion was served to; a completion id
another tenant got is unknown to the caller.

Where it lives: `--feedback-db PATH`, else `feedback.sqlite` in the `--registry` folder, else
`$XDG_DATA_HOME/lorakit/feedback.sqlite` (~/.local/share/lorakit/). WAL mode: readers never wait for the
server's writes, and several servers may share one file.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from lorakit.errors import ConfigError

FILE_NAME = "feedback.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, model TEXT NOT NULL,
    served TEXT NOT NULL, alias TEXT, variant TEXT, created REAL NOT NULL, version TEXT);
CREATE INDEX IF NOT EXISTS completions_alias ON completions (alias, variant);
CREATE TABLE IF NOT EXISTS feedback (id TEXT PRIMARY KEY REFERENCES completions (id), tenant TEXT NOT NULL,
    score REAL, preferred INTEGER, against TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS evals (run TEXT NOT NULL, version TEXT NOT NULL, name TEXT NOT NULL, task TEXT NOT NULL,
    metric TEXT NOT NULL, value REAL NOT NULL, examples INTEGER NOT NULL, base TEXT NOT NULL, data TEXT NOT NULL,
    data_sha256 TEXT, created REAL NOT NULL, PRIMARY KEY (run, metric));
CREATE INDEX IF NOT EXISTS evals_task ON evals (task, version);
"""
BASE_VERSION = "base:"  # the base model's version: "base:<its served name>" (it has no adapter digest)


def feedback_path(explicit: Optional[str], registry_folder: Optional[Union[str, Path]]) -> Path:
    """Where the store lives (see the module docstring)."""
    if explicit:
        return Path(explicit).expanduser()
    if registry_folder is not None:
        return Path(registry_folder) / FILE_NAME
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "lorakit" / FILE_NAME


def base_version(model_name: str) -> str:
    """The version of the base model named `model_name` (as `lorakit serve` names it)."""
    return BASE_VERSION + model_name


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


@dataclass(frozen=True)
class EvalRun:
    """One `lorakit eval` of an adapter version on a task: {metric: (value, examples it was measured on)}."""

    version: str
    name: str
    task: str
    base: str
    metrics: dict[str, tuple[float, int]]
    data: str
    data_sha256: Optional[str]
    created: float


@dataclass(frozen=True)
class VoteTally:
    """Head-to-head votes won and lost by the completions one version served under one `served` label."""

    version: Optional[str]  # None: completions recorded without their version
    served: str
    wins: int
    losses: int


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
            self._add_version_column()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"--feedback-db {self.path}: cannot open a feedback database there ({exc})") from None

    def _add_version_column(self) -> None:
        """A file written before completions had `version` gets the column (its old rows stay NULL)."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(completions)")}
        if "version" not in columns:
            try:
                self.db.execute("ALTER TABLE completions ADD COLUMN version TEXT")
            except sqlite3.OperationalError:  # another server sharing the file added it first
                pass

    def record(self, id: str, tenant: str, model: str, served: str, alias: Optional[str] = None,
               variant: Optional[str] = None, version: Optional[str] = None) -> None:
        self.db.execute("INSERT OR REPLACE INTO completions (id, tenant, model, served, alias, variant, created, "
                        "version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (id, tenant, model, served, alias, variant, time.time(), version))

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

    def version_votes(self, tenant: Optional[str]) -> list[VoteTally]:
        """Head-to-head votes (`tenant`'s, or everyone's: None) won and lost per version and served label; a
        vote between two completions of one version counts for neither side."""
        rows = self.db.execute(
            "SELECT c.version, c.served, sum(f.preferred), sum(1 - f.preferred) FROM feedback f "
            "JOIN completions c ON c.id = f.id JOIN completions o ON o.id = f.against "
            "WHERE f.preferred IS NOT NULL AND (c.version IS NULL OR c.version IS NOT o.version) "
            "AND (? IS NULL OR f.tenant = ?) GROUP BY c.version, c.served", (tenant, tenant)).fetchall()
        return [VoteTally(*row) for row in rows]

    def add_eval(self, run: EvalRun) -> None:
        """Keep an eval's results: one row per metric, all or none."""
        id = uuid.uuid4().hex
        rows = [(id, run.version, run.name, run.task, metric, value, examples, run.base, run.data, run.data_sha256,
                 run.created) for metric, (value, examples) in run.metrics.items()]
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO evals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def eval_runs(self) -> list[EvalRun]:
        """Every eval kept, oldest first."""
        runs: dict[str, EvalRun] = {}
        for (id, version, name, task, metric, value, examples, base, data, data_sha256, created) in self.db.execute(
                "SELECT run, version, name, task, metric, value, examples, base, data, data_sha256, created "
                "FROM evals ORDER BY created, run"):
            run = runs.setdefault(id, EvalRun(version, name, task, base, {}, data, data_sha256, created))
            run.metrics[metric] = (value, examples)
        return list(runs.values())

    def close(self) -> None:
        self.db.close()
