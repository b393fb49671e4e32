"""The leaderboard: adapter versions ranked per task by their `lorakit eval` results, and by the playground's
head-to-head votes, with the numbers behind each rank (`lorakit leaderboard`, GET /v1/leaderboard).

A version is an adapter's content digest (`Adapter.digest`, what the registry calls a version), shown with
the names it was evaluated or served under; the base model is the version `base:<model>`. Both halves live
in the feedback database (feedback.py): `lorakit eval` adds each run to its `evals` table, and each served
completion records the version that served it.

A task's board holds the latest eval of each (version, base) on that task, ranked by
    exact match, higher first        shown with its 95% Wilson interval over the n examples generated
    then loss, lower first           n: the held-out examples (a mean over their tokens: no interval)
and a row without exact match (text-only data) ranks after every row with it. Rows whose keys are equal
share a rank (1, 1, 3).
The playground's board ranks every version that won or lost a head-to-head vote by
    the lower bound of its win rate's 95% Wilson interval, higher first; then wins, more first
so 30 wins of 40 (lower bound 0.60) rank above 1 of 1 (0.21): a board of evidence, not of a lucky first vote.
"""

from __future__ import annotations

import math
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from lorakit.errors import ConfigError
from lorakit.serve import significance
from lorakit.serve.feedback import BASE_VERSION, EvalRun, VoteTally

PLAYGROUND = "playground"  # the votes' board; no eval task may take the name
RATES = ("exact_match",)  # metrics that are a share of examples, so they get a Wilson interval
TASK_RULE = "exact match, higher first (95% Wilson interval); then loss, lower first"
VOTE_RULE = "the lower bound of the win rate's 95% Wilson interval, higher first; then wins"
EMPTY = ("nothing is recorded yet: `lorakit eval --adapter DIR --data FILE` records a task's results, and votes "
         "in the playground of `lorakit serve` (/playground) rank the versions they compare")
# held-out files are often named for their split: the task is then the folder they are in
SPLIT_NAMES = {"heldout", "held_out", "held-out", "test", "eval", "valid", "validation", "val", "dev", "train"}


def default_task(data: str) -> str:
    """The task `lorakit eval --data FILE` records without --task: the file's stem (`faq.jsonl`: faq), or for a
    file named for its split (`reverse_words/heldout.jsonl`) the folder it is in (reverse_words)."""
    path = Path(data).expanduser().resolve()
    return path.parent.name if path.stem.lower() in SPLIT_NAMES and path.parent.name else path.stem


def check_task(task: str) -> str:
    if not task.strip():
        raise ConfigError("--task is empty; name the task the results are for")
    if task == PLAYGROUND:
        raise ConfigError(f"--task {PLAYGROUND}: the name is taken by the board of the playground's votes; choose "
                          "another")
    return task


def leaderboard(runs: list[EvalRun], tallies: list[VoteTally], served: Optional[dict[str, list[str]]] = None,
                task: Optional[str] = None) -> dict:
    """Every task's board and the playground's (or `task`'s alone; PLAYGROUND: the votes'), as JSON; `served`
    names versions first ({version: the names it is served under}). A task without results is a
    ConfigError that lists the known ones."""
    tasks = sorted({r.task for r in runs})
    if task is not None and task != PLAYGROUND and task not in tasks:
        known = f"known tasks: {', '.join(tasks)} ({PLAYGROUND!r} is the votes' board)" if tasks else EMPTY
        raise ConfigError(f"no eval results for the task {task!r}; {known}")
    names = version_names(runs, tallies, served or {})
    boards = [_task_board(t, [r for r in runs if r.task == t], names) for t in tasks if task in (None, t)]
    votes = _vote_board(tallies, names) if task in (None, PLAYGROUND) else None
    return {"object": "leaderboard", "tasks": boards, PLAYGROUND: votes}


def version_names(runs: list[EvalRun], tallies: list[VoteTally], served: dict[str, list[str]]) -> dict[str, list[str]]:
    """{version: its names}: those it is served under, then those it was evaluated under (latest first), then
    the labels its votes were served under; the base model's is its model's name."""
    names = {version: list(listed) for version, listed in served.items()}
    found = [(r.version, r.name) for r in reversed(runs)]
    found += [(t.version, urllib.parse.unquote(t.served.partition("@")[0])) for t in tallies if t.version]
    for version, name in found:
        name = version.removeprefix(BASE_VERSION) if version.startswith(BASE_VERSION) else name
        listed = names.setdefault(version, [])
        if name not in listed:
            listed.append(name)
    return names


def _task_board(task: str, runs: list[EvalRun], names: dict[str, list[str]]) -> dict:
    latest = {(r.version, r.base): r for r in runs}  # runs come oldest first
    ranked = _ranked(list(latest.values()), _task_key)
    rows = [{"rank": rank, **_version(run.version, names), "base": run.base,
             **{metric: _metric(metric, value, n) for metric, (value, n) in run.metrics.items()},
             "evaluated_at": _iso(run.created), "data": {"path": run.data, "sha256": run.data_sha256}}
            for rank, run in ranked]
    return {"task": task, "ranked_by": TASK_RULE, "same_data": len({r.data_sha256 for r in latest.values()}) == 1,
            "rows": rows}


def _task_key(run: EvalRun) -> tuple:
    match = run.metrics.get("exact_match")
    loss = run.metrics.get("loss", (math.inf, 0))[0]
    return (0, -match[0], loss) if match is not None else (1, 0.0, loss)


def _vote_board(tallies: list[VoteTally], names: dict[str, list[str]]) -> dict:
    totals: dict[str, list[int]] = {}
    for t in tallies:
        if t.version is not None:
            total = totals.setdefault(t.version, [0, 0])
            total[0], total[1] = total[0] + t.wins, total[1] + t.losses
    ranked = _ranked(list(totals.items()), lambda item: (-_lower_bound(*item[1]), -item[1][0]))
    rows = [{"rank": rank, **_version(version, names), "wins": wins, "losses": losses, "votes": wins + losses,
             "win_rate": wins / (wins + losses), "ci95": list(significance.wilson(wins, wins + losses))}
            for rank, (version, (wins, losses)) in ranked]
    unattributed = sum(t.wins + t.losses for t in tallies if t.version is None)  # each a side of a vote
    return {"ranked_by": VOTE_RULE, "rows": rows, "unattributed": unattributed}


def _lower_bound(wins: int, losses: int) -> float:
    return significance.wilson(wins, wins + losses)[0]


def _ranked(items: list, key) -> list[tuple[int, object]]:
    """(rank, item) best first; equal keys share the rank of the first of them."""
    ordered = sorted(items, key=key)
    ranks = []
    for i, item in enumerate(ordered):
        tied = i > 0 and key(item) == key(ordered[i - 1])
        ranks.append((ranks[-1][0] if tied else i + 1, item))
    return ranks


def _version(version: str, names: dict[str, list[str]]) -> dict:
    listed = names.get(version) or [version]
    return {"version": version, "name": listed[0], "names": listed}


def _metric(metric: str, value: float, n: int) -> dict:
    shown = {"value": value, "n": n}
    if metric in RATES:
        shown["ci95"] = list(significance.wilson(round(value * n), n)) if n else None
    return shown


def _iso(created: float) -> str:
    return datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
