"""A/B tests between adapter versions: aliases' weighted sticky splits, promotions under load, feedback and the
report's statistics, on a real `lorakit serve` with the official openai client (serve/aliases.py,
serve/feedback.py, serve/significance.py)."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from collections import Counter

import httpx
import openai
import pytest

from lorakit.serve import significance
from lorakit.serve.aliases import Alias, choose_variant
from lorakit.signing import sign_adapter
from test_serve import ADMIN_KEY, BASE, TEAM_KEY, save_random_adapter, start_server
from test_signing import _key_pair

OTHER_KEY = "other-key-789"


# --- the split, through the routing function ----------------------------------------------------------------

def test_a_90_10_split_holds_over_2000_users_and_each_user_stays_put():
    alias = Alias("support", (("support-v1", 90.0), ("support-v2", 10.0)))
    chosen = {f"user-{i}": choose_variant(alias, f"user-{i}") for i in range(2000)}
    share = Counter(chosen.values())["support-v2"] / len(chosen)
    assert abs(share - 0.10) <= 0.025, share
    assert all(choose_variant(alias, user) == variant for user, variant in list(chosen.items())[:500])
    # Promoting v2 to 50% moves only v1's users into it; nobody goes from v2 back to v1.
    half = Alias("support", (("support-v1", 50.0), ("support-v2", 50.0)))
    assert all(choose_variant(half, user) == "support-v2" for user, v in chosen.items() if v == "support-v2")
    promoted = Alias("support", (("support-v1", 0.0), ("support-v2", 100.0)))
    assert {choose_variant(promoted, user) for user in chosen} == {"support-v2"}


def test_the_statistics_match_reference_values():
    assert significance.t_quantile(0.975, 10) == pytest.approx(2.228139, abs=1e-5)
    assert significance.t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    low, high = significance.wilson(8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    low, high = significance.mean_interval([1, 2, 3, 4, 5])  # 3 ± 2.776·sqrt(2.5/5)
    assert (low, high) == (pytest.approx(1.0368, abs=1e-4), pytest.approx(4.9632, abs=1e-4))
    # Welch: t = 3.9403, df = 9.9506; p = I_{df/(df+t²)}(df/2, 1/2) by mpmath's betainc: 0.0027999868
    assert significance.welch_p([5.1, 4.9, 5.6, 5.8, 6.0, 5.5], [4.1, 4.5, 4.0, 4.8, 5.2, 4.4]) == pytest.approx(
        0.0027999868, rel=1e-6)
    # 60/100 against 45/100: z = 2.12, p = 0.034
    assert significance.two_proportion_p(60, 100, 45, 100) == pytest.approx(0.0339, abs=5e-4)


# --- a real server --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """alpha and beta behind the start-up alias "ab" (90/10); keys: ops (admin), team (base and "ab"), other
    (may create aliases of its own)."""
    folder = tmp_path_factory.mktemp("ab")
    alpha, beta = save_random_adapter(folder / "alpha", 0), save_random_adapter(folder / "beta", 1)
    sign_adapter(alpha, _key_pair(folder, "signer")[0])  # alpha has a card for the playground to show
    keys = folder / "keys.yaml"
    keys.write_text(f"{ADMIN_KEY}:\n  tenant: ops\n  admin: true\n{TEAM_KEY}:\n  tenant: team\n  models: [{BASE}, ab]\n"
                    f"{OTHER_KEY}:\n  tenant: other\n  models: [{BASE}, alpha, beta]\n  can_load_adapters: true\n")
    srv = start_server(folder, "--api-keys", str(keys), "--adapter", f"alpha={alpha}", "--adapter", f"beta={beta}",
                       "--alias", "ab=alpha:90,beta:10", "--feedback-db", str(folder / "feedback.sqlite"),
                       "--max-running", "16")
    srv.db = folder / "feedback.sqlite"
    yield srv
    srv.stop()
    assert "Traceback" not in srv.stderr.read_text()


def _complete(server, model: str, user: str, key: str = TEAM_KEY):
    raw = server.client(key).completions.with_raw_response.create(model=model, prompt="Hello", max_tokens=1,
                                                                  temperature=0, user=user)
    return raw.headers["x-lorakit-adapter"], raw.parse()


def test_alias_requests_split_by_user_and_the_model_stays_the_alias(server):
    served = {}
    for i in range(100):
        variant, done = _complete(server, "ab", f"u{i}")
        assert done.model == "ab"
        served[f"u{i}"] = variant
    assert set(served.values()) == {"alpha", "beta"}
    assert 0.01 <= Counter(served.values())["beta"] / 100 <= 0.19  # 10% ± 3σ of 100 draws
    assert all(served[u] == choose_variant(Alias("ab", (("alpha", 90.0), ("beta", 10.0))), u) for u in served)
    for user in ("u1", "u2", "u3"):
        assert {_complete(server, "ab", user)[0] for _ in range(4)} == {served[user]}
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'lorakit_variant_requests_total{alias="ab",variant="beta"}' in metrics
    assert 'lorakit_variant_time_to_first_token_seconds_count{alias="ab",variant="alpha"}' in metrics


def test_aliases_belong_to_their_tenant(server):
    other, team = server.client(OTHER_KEY), server.client(TEAM_KEY)
    made = server.post("/v1/aliases", {"alias": "mine", "targets": {"alpha": 50, "beta": 50}}, key=OTHER_KEY)
    assert made.status_code == 201, made.text
    assert server.post("/v1/aliases", {"alias": "mine", "targets": {"alpha": 1}}, key=OTHER_KEY).status_code == 200
    assert other.completions.create(model="mine", prompt="Hi", max_tokens=1).model == "mine"
    # team may not create aliases, and another tenant's alias does not exist for it
    assert server.post("/v1/aliases", {"alias": "t", "targets": {"alpha": 1}}, key=TEAM_KEY).status_code == 403
    with pytest.raises(openai.NotFoundError):
        team.completions.create(model="mine", prompt="Hi", max_tokens=1)
    assert "mine" not in {a["alias"] for a in httpx.get(f"{server.url}/v1/aliases",
                                                         headers={"Authorization": f"Bearer {TEAM_KEY}"}).json()["data"]}
    assert httpx.get(f"{server.url}/v1/aliases/mine/report",
                     headers={"Authorization": f"Bearer {TEAM_KEY}"}).status_code == 404
    # a taken name is a 409, whoever holds it: the start-up alias, an adapter
    assert server.post("/v1/aliases", {"alias": "ab", "targets": {"beta": 1}}, key=OTHER_KEY).status_code == 409
    assert server.post("/v1/aliases", {"alias": "alpha", "targets": {"beta": 1}}, key=OTHER_KEY).status_code == 409
    assert server.post("/v1/aliases", {"alias": "x", "targets": {"gamma": 1}}, key=OTHER_KEY).status_code == 404
    assert server.post("/v1/aliases", {"alias": "x", "targets": {"alpha": 0}}, key=OTHER_KEY).status_code == 400
    deleted = httpx.delete(f"{server.url}/v1/aliases/mine", headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert deleted.status_code == 204
    with pytest.raises(openai.NotFoundError):
        other.completions.create(model="mine", prompt="Hi", max_tokens=1)


def test_20_promotions_under_16_concurrent_streams_fail_no_request(server):
    failures, served, stop = [], Counter(), threading.Event()

    def stream(worker: int):
        client, n = server.client(ADMIN_KEY), 0
        while not stop.is_set():
            n += 1
            try:
                raw = client.completions.with_raw_response.create(model="canary", prompt="Hello", max_tokens=4,
                                                                  stream=True, user=f"w{worker}-{n}")
                text = "".join(chunk.choices[0].text for chunk in raw.parse() if chunk.choices)
                served[raw.headers["x-lorakit-adapter"]] += 1
                assert isinstance(text, str)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                failures.append(repr(exc))

    assert server.post("/v1/aliases", {"alias": "canary", "targets": {"alpha": 90, "beta": 10}}).status_code == 201
    workers = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for w in workers:
        w.start()
    for step in range(20):  # promote beta, roll back to alpha, ...
        weights = {"alpha": 0, "beta": 100} if step % 2 == 0 else {"alpha": 100, "beta": 0}
        assert server.post("/v1/aliases", {"alias": "canary", "targets": weights}).status_code == 200
        threading.Event().wait(0.1)
    stop.set()
    for w in workers:
        w.join()
    assert failures == [] and served["alpha"] and served["beta"], (failures[:3], served)
    last = server.client(ADMIN_KEY).completions.with_raw_response.create(model="canary", prompt="Hi", max_tokens=1)
    assert last.headers["x-lorakit-adapter"] == "alpha"  # the last step rolled back to alpha


def test_feedback_is_stored_and_reported_per_variant(server):
    split, ids = Alias("ab", (("alpha", 90.0), ("beta", 10.0))), {"alpha": [], "beta": []}
    users = {"alpha": [], "beta": []}
    for i in range(1000):
        users[choose_variant(split, f"fb{i}")].append(f"fb{i}")
    for variant in ids:
        for user in users[variant][:6]:
            served, done = _complete(server, "ab", user)
            assert served == variant
            ids[variant].append(done.id)
    for n, id in enumerate(ids["alpha"][:6]):
        assert server.post("/v1/feedback", {"id": id, "score": 4.0 + n % 2}, key=TEAM_KEY).status_code == 204
    for n, id in enumerate(ids["beta"][:6]):
        assert server.post("/v1/feedback", {"id": id, "score": 1.0 + n % 2}, key=TEAM_KEY).status_code == 204
    vote = {"id": ids["beta"][0], "preferred": True, "against": ids["alpha"][0]}
    assert server.post("/v1/feedback", vote, key=TEAM_KEY).status_code == 204
    # another tenant's completion is unknown to a key, as is a made-up id; a body must say what it scores
    assert server.post("/v1/feedback", {"id": ids["alpha"][1], "score": 1}, key=OTHER_KEY).status_code == 404
    assert server.post("/v1/feedback", {"id": "cmpl-nope", "score": 1}, key=TEAM_KEY).status_code == 404
    assert server.post("/v1/feedback", {"id": ids["alpha"][1]}, key=TEAM_KEY).status_code == 400

    report = httpx.get(f"{server.url}/v1/aliases/ab/report", headers={"Authorization": f"Bearer {TEAM_KEY}"}).json()
    alpha, beta = report["variants"]
    assert (alpha["adapter"], beta["adapter"]) == ("alpha", "beta")
    # the vote replaced the first score of each: 5, 4, 5, 4, 5 and 2, 1, 2, 1, 2 remain
    assert alpha["score"]["mean"] == pytest.approx(4.6) and alpha["score"]["count"] == 5
    assert beta["score"]["mean"] == pytest.approx(1.6) and beta["score"]["count"] == 5
    assert alpha["score"]["ci95"] == pytest.approx(list(significance.mean_interval([5, 4, 5, 4, 5])))
    assert (beta["preference"]["wins"], beta["preference"]["count"]) == (1, 1)
    assert report["comparisons"][0]["score"]["significant"] and report["significant"]
    assert alpha["completions"] >= 6 and beta["completions"] >= 6
    with sqlite3.connect(server.db) as db:  # the store is a real file, and records the variant of each id
        assert db.execute("SELECT variant FROM completions WHERE id = ?", (ids["beta"][0],)).fetchone() == ("beta",)
        assert db.execute("SELECT preferred, against FROM feedback WHERE id = ?",
                          (ids["alpha"][0],)).fetchone() == (0, ids["beta"][0])
    pairs = httpx.get(f"{server.url}/v1/feedback/pairs", headers={"Authorization": f"Bearer {TEAM_KEY}"}).json()
    assert pairs["data"] == [{"a": "alpha", "b": "beta", "a_wins": 0, "b_wins": 1, "a_win_rate": 0.0,
                              "ci95": pytest.approx(list(significance.wilson(0, 1)))}]



# --- the playground, in a real browser ------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_playground_streams_two_answers_and_stores_the_vote(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playground test needs Playwright: "
                                   "pip install playwright (and apt-get install chromium)")
    if CHROMIUM is None:
        pytest.skip("the playground test needs Debian's Chromium: apt-get install chromium")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{server.url}/playground")
        page.get_by_test_id("api-key").fill(ADMIN_KEY)
        page.get_by_test_id("api-key").press("Tab")  # the key's change event loads the models it may use
        page.wait_for_selector('[data-testid=model-a] option[value="beta"]', state="attached")
        page.get_by_test_id("model-a").select_option("alpha")
        page.get_by_test_id("model-b").select_option("beta")
        assert "version" in page.get_by_test_id("meta-a").inner_text()
        card = page.get_by_test_id("card-a").locator("summary").inner_text()  # what lorakit sign wrote, in a line
        assert card.startswith("card: base ") and " by " in card, card
        assert page.get_by_test_id("card-b").locator("summary").inner_text() == "no card (lorakit sign writes one)"
        page.get_by_test_id("max-tokens").fill("12")
        page.get_by_test_id("prompt").fill("To be, or not to be")
        page.get_by_test_id("prompt").press("Control+Enter")  # the keyboard alone runs both
        sync_api.expect(page.get_by_test_id("vote-a")).to_be_enabled(timeout=60_000)
        answers = page.get_by_test_id("answer-a").inner_text(), page.get_by_test_id("answer-b").inner_text()
        assert all(answers) and answers[0] != answers[1], answers
        # the page shows each answer whole (text shown in batches, none lost) and marks it done for screen readers
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0)
        for model, shown in zip(("alpha", "beta"), answers):
            direct = client.completions.create(model=model, prompt="To be, or not to be", max_tokens=12,
                                               temperature=0, seed=0)
            assert shown == direct.choices[0].text, (model, shown, direct.choices[0].text)
        assert [page.get_by_test_id(f"answer-{side}").get_attribute("aria-busy") for side in "ab"] == ["false"] * 2
        assert page.get_by_test_id("served-b").inner_text() == "served by beta"
        page.keyboard.press("Enter")  # the focus is on "A is better" once both answers are in
        sync_api.expect(page.get_by_test_id("status")).to_have_text("vote stored")
        sync_api.expect(page.get_by_test_id("pairs")).to_contain_text("alpha")
        browser.close()
    with sqlite3.connect(server.db) as db:
        assert db.execute("SELECT w.served, l.served FROM feedback f JOIN completions w ON w.id = f.id JOIN "
                          "completions l ON l.id = f.against WHERE f.preferred = 1 AND f.tenant = 'ops'"
                          ).fetchall() == [("alpha", "beta")]
