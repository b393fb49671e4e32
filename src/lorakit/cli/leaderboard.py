"""`lorakit leaderboard [--task NAME] [--json]`: adapter versions ranked per task by the results `lorakit eval`
recorded, and by the playground's head-to-head votes, read from the feedback database `lorakit serve`
writes (the ranking rules: serve/leaderboard.py; the page: docs/ab-testing.md#the-leaderboard).

    lorakit leaderboard                        every task's board, then the playground's
    lorakit leaderboard --task reverse_words   one board (--task playground: the votes')
    lorakit leaderboard --json                 the numbers behind each rank, as GET /v1/leaderboard gives them
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STORE_HELP = ("the SQLite file eval results and feedback are kept in, the one `lorakit serve` writes (default: "
              "feedback.sqlite in the --registry folder, else ~/.local/share/lorakit/feedback.sqlite)")


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    """--feedback-db / --registry: where the database is, found as `lorakit serve` finds it."""
    parser.add_argument("--feedback-db", metavar="PATH", help=STORE_HELP)
    parser.add_argument("--registry", metavar="PATH",
                        help="the registry folder `lorakit serve --registry` keeps the database in")


def store_path(args: argparse.Namespace) -> Path:
    from lorakit.serve.feedback import feedback_path

    return feedback_path(args.feedback_db, args.registry)


def run(args: argparse.Namespace) -> int:
    from lorakit.serve.feedback import FeedbackStore
    from lorakit.serve.leaderboard import EMPTY, PLAYGROUND, leaderboard

    path = store_path(args)
    runs, votes = [], []
    if path.is_file():  # reading never creates the database
        store = FeedbackStore(path)
        runs, votes = store.eval_runs(), store.version_votes(None)
        store.close()
    boards = leaderboard(runs, votes, task=args.task)
    if args.json:
        print(json.dumps(boards, indent=2))
    elif not boards["tasks"] and not (boards[PLAYGROUND] or {}).get("rows"):
        print(f"{path}: {EMPTY}")
    else:
        print("\n\n".join([_task_text(board) for board in boards["tasks"]] +
                          ([_votes_text(boards[PLAYGROUND])] if boards[PLAYGROUND] else [])))
    return 0


def _task_text(board: dict) -> str:
    mixed = not board["same_data"]  # some rows were scored on other data: say which
    header = ["#", "ADAPTER", "VERSION", "EXACT MATCH", "95% CI", "N", "LOSS", "N", "BASE", "EVALUATED"]
    rows = []
    for row in board["rows"]:
        match, loss = row.get("exact_match"), row.get("loss")
        cells = [str(row["rank"]), ", ".join(row["names"]), _short(row["version"]),
                 f"{100 * match['value']:.1f}%" if match else "-", _interval(match and match["ci95"]),
                 str(match["n"]) if match else "-", f"{loss['value']:.4f}" if loss else "-",
                 str(loss["n"]) if loss else "-", row["base"], row["evaluated_at"].replace("T", " ")[:16]]
        rows.append(cells + [(row["data"]["sha256"] or "-").removeprefix("sha256:")[:12]] if mixed else cells)
    text = f"{board['task']}: ranked by {board['ranked_by']}\n{_table(header + ['DATA'] * mixed, rows)}"
    if mixed:
        text += "\nnote: these rows were scored on different data (DATA: its sha256); compare rows of one DATA only"
    return text


def _votes_text(board: dict) -> str:
    title = f"playground: head-to-head votes, ranked by {board['ranked_by']}"
    if not board["rows"]:
        return f"{title}\nno votes yet: vote between two answers at http://HOST:PORT/playground of `lorakit serve`"
    rows = [[str(r["rank"]), ", ".join(r["names"]), _short(r["version"]), str(r["wins"]), str(r["losses"]),
             f"{100 * r['win_rate']:.1f}%", _interval(r["ci95"])] for r in board["rows"]]
    text = f"{title}\n{_table(['#', 'ADAPTER', 'VERSION', 'WINS', 'LOSSES', 'WIN RATE', '95% CI'], rows)}"
    if board["unattributed"]:
        text += (f"\nnot counted: {board['unattributed']} win(s) and loss(es) of completions with no adapter version "
                 "(mixtures, or recorded by an older lorakit serve)")
    return text


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Columns as wide as their widest cell; text to the left, figures to the right."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    left = {"ADAPTER", "VERSION", "BASE", "EVALUATED", "DATA"}
    return "\n".join("  ".join(cell.ljust(w) if name in left else cell.rjust(w)
                               for cell, w, name in zip(line, widths, header)).rstrip()
                     for line in [header, *rows])


def _short(version: str) -> str:
    """A digest's first 12 hex digits (as `lorakit registry list` shows versions); the base model's: base."""
    from lorakit.serve.feedback import BASE_VERSION

    return "base" if version.startswith(BASE_VERSION) else version.removeprefix("sha256:")[:12]


def _interval(ci) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "-"


def register(commands) -> None:
    parser = commands.add_parser("leaderboard", help="rank adapter versions per task (lorakit eval) and by votes",
                                 description="Rank adapter versions per task by the results `lorakit eval` "
                                             "recorded (exact match, then loss), and by the playground's "
                                             "head-to-head votes (the lower bound of the win rate's 95% "
                                             "interval), with the numbers behind each rank.")
    parser.add_argument("--task", metavar="NAME", help="one task's board (playground: the votes'); default: all")
    parser.add_argument("--json", action="store_true", help="print the boards as JSON (as GET /v1/leaderboard)")
    add_store_flags(parser)
    parser.set_defaults(run=run)
