"""Adapters belong to tenants, and runtime loading is the operator's policy: real servers on loopback with
three tenants (a, b and an admin), real adapter folders, symlinks and a hub that does not answer."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import ExitStack

import httpx
import pytest

from lorakit.errors import ConfigError
from lorakit.serve import AdapterSources
from test_serve import BASE, PROMPT, assert_openai_error, save_random_adapter, start_server

KEY_A, KEY_B, KEY_ADMIN = "key-tenant-a", "key-tenant-b", "key-admin"
MEDIUM = {"max_tokens": 500, "ignore_eos": True, "temperature": 0}  # ~4 s of decoding on two idle CPU cores
LONG = {**MEDIUM, "max_tokens": 1000}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An adapter root with two adapters, a file, and three ways out of it; an adapter outside it."""
    base = tmp_path_factory.mktemp("tenancy")
    root, outside = base / "root", base / "outside"
    save_random_adapter(root / "one", 1)
    save_random_adapter(root / "two", 2)
    save_random_adapter(outside / "three", 3)
    (root / "notes.txt").write_text("not an adapter")
    (root / "escape").symlink_to(outside / "three", target_is_directory=True)
    sneaky = root / "sneaky"  # a real folder whose weights file is a symlink out of the root
    sneaky.mkdir()
    (sneaky / "adapter_config.json").write_text((root / "one" / "adapter_config.json").read_text())
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "three" / "adapter_model.safetensors")
    return {"base": base, "root": root, "outside": outside}


@pytest.fixture(scope="module")
def server(folders):
    """Tenant a (base model only, one sequence and one waiting request at a time), tenant b (every model
    given at start-up), an admin; runtime loading from the root; the start-up adapter `startup`."""
    keys = folders["base"] / "keys.json"
    keys.write_text(json.dumps({
        KEY_A: {"tenant": "a", "models": [BASE], "can_load_adapters": True, "max_running": 1, "max_queued": 1},
        KEY_B: {"tenant": "b", "models": "*", "can_load_adapters": True},
        KEY_ADMIN: {"tenant": "ops", "models": [], "admin": True},
    }))
    srv = start_server(folders["base"], "--api-keys", str(keys), "--allow-runtime-loading", "--adapter-root",
                       str(folders["root"]), "--adapter", f"startup={folders['root'] / 'two'}", "--max-running", "2")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.stderr.read_text()


def load(server, key, name, path, **extra):
    return server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path), **extra}, key=key)


def unload(server, key, name):
    return server.post("/v1/unload_lora_adapter", {"lora_name": name}, key=key)


def complete(server, key, model, **extra):
    return server.post("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 2, **extra}, key=key)


def listed(server, key) -> set[str]:
    return {m["id"] for m in httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
            ["data"]}


def body_without(response: httpx.Response, word: str) -> str:
    """The response's status and body with `word` (the name or path it was asked about) blanked out."""
    return f"{response.status_code} {response.text.replace(word, '<word>')}"


# --- the operator's policy ---------------------------------------------------------------------------------

def test_runtime_loading_is_off_unless_the_operator_turns_it_on(tmp_path, folders):
    srv = start_server(tmp_path)  # no keys, no flags: one anonymous tenant
    try:
        assert {m["id"] for m in httpx.get(f"{srv.url}/v1/models").json()["data"]} == {BASE}
        for refused in (load(srv, None, "one", folders["root"] / "one"), unload(srv, None, "one")):
            error = assert_openai_error(refused, 403)
            assert "--allow-runtime-loading" in error["message"] and error["code"] == "runtime_loading_off"
    finally:
        srv.stop()
    with pytest.raises(ConfigError, match="--adapter-root"):  # turned on, it needs somewhere to load from
        AdapterSources(runtime_loading=True)


def test_paths_outside_the_roots_are_refused_like_missing_ones(server, folders):
    root, outside = folders["root"], folders["outside"]
    refused = [outside / "three",                    # exists, outside every root
               root / "nothing-here", "nothing-here",  # does not exist (absolute, relative)
               "escape",                             # a symlink in the root to a folder outside it
               "sneaky",                             # a folder whose weights file is a symlink out
               "../outside/three",                   # relative, climbing out
               root / "notes.txt", "notes.txt",      # a file
               "/etc", "someone/adapter"]            # elsewhere; a hub id is a local path unless asked
    answers = {body_without(load(server, KEY_B, "x", path), str(path)) for path in refused}
    assert len(answers) == 1, answers
    assert answers.pop().startswith("404 ")
    assert "x" not in listed(server, KEY_ADMIN)

    for bad in ("~root/one", "one\0", "a" * 5000, ""):
        assert_openai_error(load(server, KEY_B, "x", bad), 400)
    hub = assert_openai_error(load(server, KEY_B, "x", "someone/adapter", lora_source="hub"), 403)
    assert "--allow-hub-downloads" in hub["message"]

    assert load(server, KEY_B, "relative", "one").status_code == 200  # relative to the root
    assert load(server, KEY_B, "absolute", root / "one").status_code == 200
    assert unload(server, KEY_B, "relative").status_code == unload(server, KEY_B, "absolute").status_code == 200


def test_an_adapter_belongs_to_the_tenant_that_loaded_it(server, folders):
    assert load(server, KEY_A, "secret-a", "one").status_code == 200
    assert listed(server, KEY_A) == {BASE, "secret-a"}
    assert complete(server, KEY_A, "secret-a").status_code == 200

    # Tenant b, whose models list is "*", can neither see, use, replace nor unload it, and cannot tell it
    # from a name that does not exist.
    assert listed(server, KEY_B) == {BASE, "startup"}
    attempts = {
        "use": lambda name: complete(server, KEY_B, name),
        "chat": lambda name: server.post("/v1/chat/completions", {"model": name, "max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"}]}, key=KEY_B),
        "unload": lambda name: unload(server, KEY_B, name),
        "replace": lambda name: load(server, KEY_B, name, "two", load_inplace=True),
    }
    for what, attempt in attempts.items():
        hidden, missing = attempt("secret-a"), attempt("no-such-adapter")
        assert hidden.status_code == 404, (what, hidden.text)
        assert body_without(hidden, "secret-a") == body_without(missing, "no-such-adapter"), what
    taken = assert_openai_error(load(server, KEY_B, "secret-a", "two"), 409)  # names are one namespace
    assert "secret-a" in taken["message"] and str(folders["root"]) not in taken["message"]
    assert complete(server, KEY_A, "secret-a").status_code == 200  # still a's, still served

    # A model a's models list leaves out is as absent as one that does not exist; only admins change start-up ones.
    assert body_without(complete(server, KEY_A, "startup"), "startup") == \
        body_without(complete(server, KEY_A, "no-such-adapter"), "no-such-adapter")
    assert assert_openai_error(unload(server, KEY_B, "startup"), 403)["code"] == "adapter_not_owned"
    assert_openai_error(load(server, KEY_B, "startup", "one", load_inplace=True), 403)
    assert_openai_error(load(server, KEY_B, "startup", "one"), 409)

    # The admin sees everything and may change it.
    assert listed(server, KEY_ADMIN) == {BASE, "startup", "secret-a"}
    assert complete(server, KEY_ADMIN, "secret-a").status_code == 200
    assert load(server, KEY_ADMIN, "secret-a", "two", load_inplace=True).status_code == 200
    assert listed(server, KEY_A) == {BASE, "secret-a"}  # still a's after the admin replaced it
    assert unload(server, KEY_ADMIN, "secret-a").status_code == 200
    assert listed(server, KEY_A) == {BASE}


def test_metrics_do_not_name_runtime_adapters(server):
    assert load(server, KEY_A, "private-name", "one").status_code == 200
    assert complete(server, KEY_A, "private-name").status_code == 200
    complete(server, KEY_B, "private-name")  # b's 404 is counted under "-"
    assert complete(server, KEY_B, "startup").status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    assert "private-name" not in text
    assert server.metric("lorakit_requests_total", '{model="runtime",status="200"}') >= 1
    assert server.metric("lorakit_requests_total", '{model="startup",status="200"}') >= 1
    assert unload(server, KEY_A, "private-name").status_code == 200


def test_two_loads_of_one_name_one_wins(server):
    results = {}
    start = threading.Barrier(2)

    def race(key):
        start.wait()
        results[key] = load(server, key, "contested", "one").status_code

    threads = [threading.Thread(target=race, args=(key,)) for key in (KEY_A, KEY_B)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results.values()) == [200, 409], results
    winner = next(key for key, status in results.items() if status == 200)
    loser = KEY_B if winner == KEY_A else KEY_A
    assert "contested" in listed(server, winner) and "contested" not in listed(server, loser)
    assert unload(server, winner, "contested").status_code == 200


def _wait_for(server, metric: str, at_least: int) -> None:
    deadline = time.monotonic() + 10
    while server.metric(metric) < at_least:
        assert time.monotonic() < deadline, f"{metric} never reached {at_least}"
        time.sleep(0.02)


def _in_thread(results: dict, name: str, send) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.__setitem__(name, send()))
    thread.start()
    return thread


def _stream(stack: ExitStack, server, key: str, model: str) -> httpx.Response:
    """A long streaming request, open (running or queued) until `stack` closes, which cancels it."""
    response = stack.enter_context(httpx.stream(
        "POST", f"{server.url}/v1/completions", json={"model": model, "prompt": PROMPT, "stream": True, **LONG},
        headers={"Authorization": f"Bearer {key}"}, timeout=60))
    assert response.status_code == 200
    return response


def test_unloading_fails_queued_requests_and_lets_running_ones_finish(server):
    server.wait_idle()
    assert load(server, KEY_A, "doomed", "one").status_code == 200
    results = {}
    running = _in_thread(results, "running", lambda: complete(server, KEY_A, "doomed", **MEDIUM))
    _wait_for(server, "lorakit_running_sequences", 1)
    queued = _in_thread(results, "queued", lambda: complete(server, KEY_A, "doomed", **MEDIUM))  # a's max_running
    _wait_for(server, "lorakit_waiting_requests", 1)

    assert unload(server, KEY_A, "doomed").status_code == 200
    queued.join(timeout=5)
    error = assert_openai_error(results["queued"], 409)
    assert error["code"] == "adapter_unloaded" and "unloaded" in error["message"]
    running.join(timeout=30)
    assert results["running"].status_code == 200
    assert results["running"].json()["usage"]["completion_tokens"] == MEDIUM["max_tokens"]


def test_tenant_quotas_queue_and_refuse_only_that_tenant(server):
    server.wait_idle()
    with ExitStack() as stack:
        _stream(stack, server, KEY_A, BASE)
        _wait_for(server, "lorakit_running_sequences", 1)
        _stream(stack, server, KEY_A, BASE)  # waits: a's max_running is 1, though a row is free
        _wait_for(server, "lorakit_waiting_requests", 1)

        full = complete(server, KEY_A, BASE)  # a's max_queued is 1
        assert assert_openai_error(full, 429)["type"] == "rate_limit_error"
        assert int(full.headers["Retry-After"]) >= 1
        assert complete(server, KEY_B, BASE, max_tokens=8).status_code == 200  # b runs beside a's, ahead of it
        assert server.metric("lorakit_waiting_requests") == 1 and server.metric("lorakit_running_sequences") == 1
    server.wait_idle()  # closing a's connections cancelled both


# --- the hub -----------------------------------------------------------------------------------------------

@pytest.fixture()
def silent_hub():
    """A port that accepts connections and never answers: a hub that hangs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_a_hub_that_does_not_answer_gets_a_503_in_time(tmp_path, silent_hub):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=silent_hub, HF_HOME=str(tmp_path / "hf"))
    srv = start_server(tmp_path, "--api-key", KEY_ADMIN, "--allow-runtime-loading", "--allow-hub-downloads",
                       "--hub-timeout", "1", env=env)
    try:
        started = time.monotonic()
        hung = load(srv, KEY_ADMIN, "remote", "someone/adapter")  # no root: a hub id by default
        assert assert_openai_error(hung, 503)["code"] == "hub_unavailable"
        assert time.monotonic() - started < 5
        assert_openai_error(load(srv, KEY_ADMIN, "local", "one", lora_source="local"), 400)  # no root to read
        assert_openai_error(load(srv, KEY_ADMIN, "bad", "../x/y", lora_source="hub"), 400)
        assert complete(srv, KEY_ADMIN, BASE).status_code == 200
    finally:
        srv.stop()
    assert srv.proc.returncode == 0 and "Traceback" not in srv.stderr.read_text()
