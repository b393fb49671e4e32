"""The leaderboard: `lorakit eval` keeps its results with the adapter's version, the playground's votes count
per version, and `lorakit leaderboard` and GET /v1/leaderboard rank them with the numbers behind each rank
(serve/leaderboard.py), on the embedded model, the example adapters, a real SQLite file and a real server."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sqlite3
from pathlib import Path

import httpx
import pytest

from lorakit import Adapter
from lorakit.cli import main
from lorakit.serve import significance
from lorakit.serve.feedback import EvalRun, FeedbackStore, VoteTally
from lorakit.serve.leaderboard import default_task, leaderboard
from lorakit.signing.card import file_sha256
from test_serve import ADMIN_KEY, BASE, TEAM_KEY, assert_openai_error, start_server

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
REVERSE, JSON = EXAMPLES / "adapters" / "reverse", EXAMPLES / "adapters" / "json"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Evals kept in one database: the reverse example adapter and the bare base model on 4 held-out rows of
    reverse_words (the task named by default), and the json example adapter under --task scratch."""
    folder = tmp_path_factory.mktemp("leaderboard")
    data = folder / "reverse_words" / "heldout.jsonl"
    data.parent.mkdir()
    data.write_text("".join((EXAMPLES / "skills" / "reverse_words" / "heldout.jsonl").read_text().splitlines(True)[:4]))
    db = folder / "feedback.sqlite"
    out, err = io.StringIO(), io.StringIO()
    for flags in (["--adapter", str(REVERSE)], [], ["--adapter", str(JSON), "--task", "scratch"]):
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert main(["eval", *flags, "--data", str(data), "--samples", "4", "--feedback-db", str(db)]) == 0
    return {"folder": folder, "data": data, "db": db, "stdout": out.getvalue(), "stderr": err.getvalue()}


def test_eval_keeps_each_metric_with_the_adapter_version_task_base_and_data(recorded):
    with sqlite3.connect(recorded["db"]) as db:
        rows = db.execute("SELECT version, name, task, metric, examples, base, data, data_sha256 FROM evals").fetchall()
    assert {(version, name, task) for version, name, task, *_ in rows} == {
        (Adapter.read(REVERSE).digest, "reverse", "reverse_words"), (f"base:{BASE}", BASE, "reverse_words"),
        (Adapter.read(JSON).digest, "json", "scratch")}
    assert {metric for _, _, _, metric, *_ in rows} == {"loss", "perplexity", "exact_match"}
    assert {(examples, base) for *_, examples, base, _, _ in rows} == {(4, BASE)}  # 4 rows scored, 4 generated
    data = recorded["data"].resolve()
    assert {(path, sha) for *_, path, sha in rows} == {(str(data), file_sha256(data))}
    # eval's own output is what it was; where the results went is said on stderr
    first = recorded["stdout"].splitlines()[0]
    assert first.startswith(f"{recorded['data']}: loss ") and first.endswith("exact match 100.0% of 4")
    assert "recorded as task 'reverse_words'" in recorded["stderr"] and "as task 'scratch'" in recorded["stderr"]


def test_the_board_ranks_by_exact_match_with_the_numbers_behind_it(recorded, capsys):
    assert main(["leaderboard", "--json", "--feedback-db", str(recorded["db"])]) == 0
    boards = json.loads(capsys.readouterr().out)
    assert [b["task"] for b in boards["tasks"]] == ["reverse_words", "scratch"]
    board = boards["tasks"][0]
    assert board["same_data"] and [r["rank"] for r in board["rows"]] == [1, 2]
    first, second = board["rows"]
    assert (first["name"], first["exact_match"]["value"], first["exact_match"]["n"]) == ("reverse", 1.0, 4)
    assert first["exact_match"]["ci95"] == pytest.approx(list(significance.wilson(4, 4)))
    assert first["version"] == Adapter.read(REVERSE).digest and first["base"] == BASE
    assert (second["name"], second["version"], second["exact_match"]["value"]) == (BASE, f"base:{BASE}", 0.0)
    assert second["loss"]["value"] > first["loss"]["value"] and second["loss"]["n"] == 4
    assert boards["playground"] == {"ranked_by": boards["playground"]["ranked_by"], "rows": [], "unattributed": 0}


def test_bad_input_is_one_clear_line(recorded, tmp_path, capsys):
    assert main(["leaderboard", "--task", "nope", "--feedback-db", str(recorded["db"])]) == 2
    assert "no eval results for the task 'nope'; known tasks: reverse_words, scratch" in capsys.readouterr().err
    empty = tmp_path / "empty.sqlite"
    assert main(["leaderboard", "--feedback-db", str(empty)]) == 0
    assert "nothing is recorded yet: `lorakit eval --adapter DIR --data FILE`" in capsys.readouterr().out
    assert not empty.exists()  # reading never creates the database
    assert main(["leaderboard", "--task", "nope", "--feedback-db", str(empty)]) == 2
    assert "nothing is recorded yet" in capsys.readouterr().err
    assert main(["eval", "--task", "playground", "--data", str(recorded["data"]), "--feedback-db", str(empty)]) == 2
    assert "the name is taken by the board of the playground's votes" in capsys.readouterr().err


def test_the_default_task_is_the_file_stem_or_the_folder_of_a_split_file():
    assert default_task("data/faq.jsonl") == "faq"
    assert default_task("runs/x/data/reverse_words/heldout.jsonl") == "reverse_words"
    assert default_task("sql/test.parquet") == "sql"


def _run(version: str, task: str = "t", created: float = 0.0, **metrics) -> EvalRun:
    return EvalRun(version, version, task, BASE, {m: (v, 10) for m, v in metrics.items()}, "d.jsonl", None, created)


def test_ranking_rules_ties_missing_metrics_latest_runs_and_votes():
    runs = [_run("a", exact_match=0.5, loss=2.0), _run("b", exact_match=0.5, loss=2.0),
            _run("c", loss=0.1), _run("d", exact_match=0.1, loss=3.0),
            _run("d", created=1.0, exact_match=0.9, loss=1.0)]  # d's later eval replaces its first
    (board,) = leaderboard(runs, [], task="t")["tasks"]
    assert [(r["version"], r["rank"]) for r in board["rows"]] == [("d", 1), ("a", 2), ("b", 2), ("c", 4)]
    # 30 of 40 (lower bound 0.60) ranks above 1 of 1 (0.21); a vote's two sides count for their versions
    tallies = [VoteTally("lucky", "lucky", 1, 0), VoteTally("steady", "steady", 20, 5),
               VoteTally("steady", "steady%40copy", 10, 5), VoteTally(None, "old", 3, 3)]
    votes = leaderboard([], tallies, task="playground")["playground"]
    assert [(r["name"], r["wins"], r["losses"], r["rank"]) for r in votes["rows"]] == [("steady", 30, 10, 1),
                                                                                       ("lucky", 1, 0, 2)]
    assert votes["rows"][0]["names"] == ["steady", "steady@copy"] and votes["unattributed"] == 6
    assert votes["rows"][0]["ci95"] == pytest.approx(list(significance.wilson(30, 40)))


def test_a_task_scored_on_different_data_says_so(tmp_path, capsys):
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    for n in (1, 2):
        store.add_eval(EvalRun(f"sha256:{n}", f"v{n}", "t", BASE, {"loss": (float(n), 3)}, "d.jsonl",
                               f"sha256:{str(n) * 64}", 0.0))
    store.close()
    assert main(["leaderboard", "--task", "t", "--feedback-db", str(tmp_path / "feedback.sqlite")]) == 0
    header, first, second, note = capsys.readouterr().out.splitlines()[1:]
    assert header.split()[-1] == "DATA" and (first.split()[-1], second.split()[-1]) == ("1" * 12, "2" * 12)
    assert note.startswith("note: these rows were scored on different data")


def test_a_feedback_file_from_before_versions_opens_and_its_votes_are_not_counted(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # the schema lorakit serve wrote before completions had a version
        db.executescript("CREATE TABLE completions (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, model TEXT NOT NULL, "
                         "served TEXT NOT NULL, alias TEXT, variant TEXT, created REAL NOT NULL);"
                         "CREATE TABLE feedback (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, score REAL, "
                         "preferred INTEGER, against TEXT, created REAL NOT NULL);"
                         "INSERT INTO completions VALUES ('a', 't', 'm', 'x', NULL, NULL, 0), "
                         "('b', 't', 'm', 'y', NULL, NULL, 0);"
                         "INSERT INTO feedback VALUES ('a', 't', NULL, 1, 'b', 0), ('b', 't', NULL, 0, 'a', 0);")
    store = FeedbackStore(path)
    store.record("c", "t", "m", "x", version="sha256:abc")
    assert store.db.execute("SELECT id, version FROM completions ORDER BY id").fetchall() == [
        ("a", None), ("b", None), ("c", "sha256:abc")]
    board = leaderboard([], store.version_votes(None))["playground"]
    assert (board["rows"], board["unattributed"]) == ([], 2)


# --- a real server ------------------------------------------------------------------------------------------

def test_the_server_ranks_what_each_key_may_see_and_counts_playground_votes(recorded, capsys):
    """rev-v2 serves the reverse adapter (the version eval recorded as "reverse"), json the json adapter; team
    sees the base and rev-v2 only."""
    folder, db = recorded["folder"], recorded["folder"] / "served.sqlite"
    shutil.copy(recorded["db"], db)  # the votes go into a copy: the other tests see the evals alone
    keys = folder / "keys.yaml"
    keys.write_text(f"{ADMIN_KEY}:\n  tenant: ops\n  admin: true\n{TEAM_KEY}:\n  tenant: team\n"
                    f"  models: [{BASE}, rev-v2]\n")
    server = start_server(folder, "--api-keys", str(keys), "--adapter", f"rev-v2={REVERSE}", "--adapter",
                          f"json={JSON}", "--feedback-db", str(db))
    try:
        def board(key=ADMIN_KEY, query=""):
            return httpx.get(f"{server.url}/v1/leaderboard{query}", headers={"Authorization": f"Bearer {key}"})

        def vote(winner: str, loser: str) -> None:
            ids = [server.client().completions.create(model=m, prompt="Hi", max_tokens=1).id for m in (winner, loser)]
            assert server.post("/v1/feedback", {"id": ids[0], "preferred": True, "against": ids[1]}).status_code == 204

        for winner, loser in [("rev-v2", "json")] * 3 + [("json", "rev-v2"), (BASE, "json")]:
            vote(winner, loser)
        everything = board().json()
        rows = everything["tasks"][0]["rows"]
        assert [(r["name"], r["names"]) for r in rows] == [("rev-v2", ["rev-v2", "reverse"]), (BASE, [BASE])]
        assert everything["tasks"][1]["rows"][0]["name"] == "json"
        votes = {r["name"]: (r["wins"], r["losses"], r["rank"]) for r in everything["playground"]["rows"]}
        assert votes == {"rev-v2": (3, 1, 1), BASE: (1, 0, 2), "json": (1, 4, 3)}
        assert everything["playground"]["rows"][0]["ci95"] == pytest.approx(list(significance.wilson(3, 4)))

        # team: json, and so the task only json was scored on, do not exist for it; the votes are ops'
        team = board(TEAM_KEY).json()
        assert [(b["task"], [r["name"] for r in b["rows"]]) for b in team["tasks"]] == [("reverse_words",
                                                                                          ["rev-v2", BASE])]
        assert team["playground"]["rows"] == []
        assert "known tasks: reverse_words (" in assert_openai_error(board(TEAM_KEY, "?task=scratch"), 404)["message"]
        only = board(query="?task=playground").json()
        assert only["tasks"] == [] and len(only["playground"]["rows"]) == 3
        assert board(query="?task=reverse_words").json()["playground"] is None
        error = assert_openai_error(board(query="?task=nope"), 404)
        assert "known tasks: reverse_words, scratch" in error["message"] and error["param"] == "task"
        assert board("wrong-key").status_code == 401
        doc = httpx.get(f"{server.url}/openapi.json").json()
        assert set(doc["paths"]["/v1/leaderboard"]["get"]["responses"]) == {"200", "400", "401", "404", "408", "413",
                                                                            "500", "503"}
    finally:
        server.stop()
    assert "Traceback" not in server.stderr.read_text()

    # the command line reads the same file: both boards, as tables
    assert main(["leaderboard", "--feedback-db", str(db)]) == 0
    lines, short = capsys.readouterr().out.splitlines(), Adapter.read(REVERSE).short_digest
    assert lines[0].startswith("reverse_words: ranked by exact match")
    # the names a version was evaluated under, then those it was voted under
    assert lines[2].split()[:6] == ["1", "reverse,", "rev-v2", short, "100.0%", "[51.0,"]
    votes_at = lines.index(next(line for line in lines if line.startswith("playground:")))
    assert lines[votes_at + 2].split()[:6] == ["1", "reverse,", "rev-v2", short, "3", "1"]
