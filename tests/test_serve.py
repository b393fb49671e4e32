"""`lorakit serve`: real servers (`python -m lorakit.cli serve` subprocesses) on loopback, the embedded
model and real adapters, spoken to with the official `openai` client and, for raw cases, httpx."""

from __future__ import annotations

import hashlib
import json
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx
import openai
import pytest
import torch

import lorakit
from lorakit.models import EMBEDDED_NAME, load_model, load_tokenizer

BASE = EMBEDDED_NAME
ADMIN_KEY, TEAM_KEY = "admin-key-123", "team-key-456"
PROMPT = "To be, or not to be, that is the question:"
LONG = {"max_tokens": 1000, "ignore_eos": True, "temperature": 0}  # ~1.4 s of decoding on two CPU cores


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    stderr: Path

    def client(self, key: str = ADMIN_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, path: str, body, key: str = ADMIN_KEY, **kwargs) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        return httpx.post(f"{self.url}{path}", content=content, headers=headers, timeout=kwargs.pop("timeout", 60),
                          **kwargs)

    def metric(self, name: str, labels: str = "") -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name}{{")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def wait_metric(self, name: str, above: float = 0.0, timeout: float = 10.0) -> float:
        """The metric once it is above `above`: the engine's figures reach /metrics with its heartbeat."""
        deadline = time.monotonic() + timeout
        while (value := self.metric(name)) <= above:
            assert time.monotonic() < deadline, f"{name} stayed at {value}"
            time.sleep(0.05)
        return value

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.metric("lorakit_running_sequences") or self.metric("lorakit_waiting_requests"):
            assert time.monotonic() < deadline, "the engine did not go idle"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_server(folder: Path, *flags: str, env: Optional[dict] = None) -> Server:
    stderr = folder / "serve.stderr"
    # fp32: a request's greedy tokens do not depend on what it is batched with, so outputs can be compared.
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "serve", "--port", "0", "--dtype", "fp32", *flags],
                            stdout=subprocess.PIPE, stderr=stderr.open("w"), text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if "http://" in line:
                return Server(proc, line.split(" at ")[1].strip().removesuffix("/v1"), stderr)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"lorakit serve did not start:\n{stderr.read_text()}")


def save_random_adapter(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = load_model(None)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    lorakit.save_adapter(model, folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    folders = {name: save_random_adapter(root / name, seed) for seed, name in enumerate(["alpha", "beta", "gamma"])}
    broken = save_random_adapter(root / "broken", 9)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    folders["broken"] = broken
    return folders


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    """Two tenants: ops (every model, may load adapters from the adapters' folder) and team (base and alpha
    only; key stored hashed)."""
    folder = tmp_path_factory.mktemp("server")
    keys = folder / "keys.yaml"
    keys.write_text(f"{ADMIN_KEY}:\n  tenant: ops\n  models: '*'\n  can_load_adapters: true\n"
                    f"'sha256:{hashlib.sha256(TEAM_KEY.encode()).hexdigest()}':\n"
                    f"  tenant: team\n  models: [{BASE}, alpha]\n")
    srv = start_server(folder, "--api-keys", str(keys), "--adapter", f"alpha={adapters['alpha']}",
                       "--adapter", f"beta={adapters['beta']}", "--max-running", "4", "--allow-runtime-loading",
                       "--adapter-root", str(adapters["alpha"].parent))
    yield srv
    srv.stop()
    assert "Traceback" not in srv.stderr.read_text()


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


# --- the OpenAI API -------------------------------------------------------------------------------------

def test_models_lists_the_base_and_its_adapters(server):
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {BASE, "alpha", "beta"}
    assert models["alpha"].parent == BASE and models[BASE].parent is None


def test_completion_and_chat_count_their_tokens(server):
    client, tokenizer = server.client(), load_tokenizer(None)
    done = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=12, temperature=0)
    assert done.choices[0].text and done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"]) and done.usage.completion_tokens == 12
    assert done.usage.total_tokens == done.usage.prompt_tokens + 12

    ids = tokenizer(PROMPT)["input_ids"]
    by_ids = server.post("/v1/completions", {"model": BASE, "prompt": ids, "max_tokens": 12, "temperature": 0})
    assert by_ids.json()["choices"][0]["text"] == done.choices[0].text  # token ids in, same text out

    chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Speak."}],
                                          max_completion_tokens=10, temperature=0, seed=1, user="u-1")
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 10
    assert chat.object == "chat.completion" and chat.model == "alpha"
    parts = client.chat.completions.create(model="alpha", max_tokens=10, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Spe"}, {"type": "text", "text": "ak."}]}])
    assert parts.choices[0].message.content == chat.choices[0].message.content


def test_streaming_gives_the_same_text_as_a_whole_answer(server):
    client = server.client()
    whole = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model="alpha", prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    whole = client.chat.completions.create(model=BASE, messages=messages, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(model=BASE, messages=messages, max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == whole.choices[0].message.content


def test_the_model_field_picks_the_adapter(server):
    client = server.client()
    texts = {name: client.completions.create(model=name, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
             for name in (BASE, "alpha", "beta")}
    assert len(set(texts.values())) == 3, texts


def test_adapters_load_and_unload_at_run_time(server, adapters):
    loaded = server.post("/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(adapters["gamma"])})
    assert loaded.status_code == 200, loaded.text
    client = server.client()
    assert {m.id: m.parent for m in client.models.list().data}["gamma"] == BASE
    assert client.completions.create(model="gamma", prompt=PROMPT, max_tokens=4).usage.completion_tokens == 4

    again = server.post("/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(adapters["beta"])})
    assert "already loaded" in assert_openai_error(again, 409)["message"]
    replaced = server.post("/v1/load_lora_adapter",
                           {"lora_name": "gamma", "lora_path": str(adapters["beta"]), "load_inplace": True})
    assert replaced.status_code == 200

    assert server.post("/v1/unload_lora_adapter", {"lora_name": "gamma"}).status_code == 200
    assert "gamma" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma", prompt=PROMPT, max_tokens=4)
    assert_openai_error(server.post("/v1/unload_lora_adapter", {"lora_name": "gamma"}), 404)


def test_a_bad_adapter_is_refused_and_the_others_keep_serving(server, adapters):
    for name, path, status in (("broken", adapters["broken"], 400),
                               ("missing", adapters["broken"].parent / "nothing-here", 404)):
        error = assert_openai_error(server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}),
                                    status)
        assert str(path) in error["message"]
    assert_openai_error(server.post("/v1/load_lora_adapter", {"lora_name": BASE, "lora_path": str(adapters["beta"])}),
                        400)
    client = server.client()
    assert "broken" not in {m.id for m in client.models.list().data}
    assert client.completions.create(model="alpha", prompt=PROMPT, max_tokens=4).usage.completion_tokens == 4


# --- who may call ----------------------------------------------------------------------------------------

def test_keys_tenants_and_models(server, adapters):
    assert_openai_error(server.post("/v1/completions", {"model": BASE, "prompt": "x"}, key=None), 401)
    with pytest.raises(openai.AuthenticationError):
        server.client("not-a-key").models.list()

    team = server.client(TEAM_KEY)  # stored as its sha256
    assert {m.id for m in team.models.list().data} == {BASE, "alpha"}
    assert team.completions.create(model="alpha", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.NotFoundError):  # a model the key may not use looks like one that does not exist
        team.completions.create(model="beta", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        team.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert_openai_error(server.post("/v1/load_lora_adapter", {"lora_name": "g", "lora_path": str(adapters["gamma"])},
                                    key=TEAM_KEY), 403)
    assert_openai_error(server.post("/v1/unload_lora_adapter", {"lora_name": "alpha"}, key=TEAM_KEY), 403)

    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # open, like /metrics
    assert httpx.get(f"{server.url}/metrics").status_code == 200


# --- bad requests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/completions", b'{"model": "alpha", "prompt": ', None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", None, "JSON object"),
    ("/v1/completions", {"model": BASE, "prompt": ""}, "prompt", "empty"),
    ("/v1/completions", {"model": BASE, "prompt": PROMPT, "max_tokens": 10**9}, "max_tokens", "context length"),
    ("/v1/completions", {"model": BASE, "prompt": PROMPT, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ("/v1/completions", {"model": BASE, "prompt": PROMPT, "frobnicate": 1}, "frobnicate", "unknown field"),
    ("/v1/completions", {"model": BASE, "prompt": PROMPT, "temperature": "hot"}, "temperature", "number"),
    ("/v1/completions", {"model": BASE, "prompt": PROMPT, "max_tokens": True}, "max_tokens", "integer"),
    ("/v1/completions", {"model": BASE, "prompt": PROMPT, "n": 2}, "n", "must be 1"),
    ("/v1/completions", {"model": BASE, "prompt": PROMPT, "logprobs": 2}, "logprobs", "not supported"),
    ("/v1/completions", {"model": BASE, "prompt": [5, 10**7]}, None, "token ids"),
    ("/v1/completions", {"prompt": PROMPT}, "model", "required"),
    ("/v1/chat/completions", {"model": BASE, "messages": []}, "messages", "at least one"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "hi", "mood": 1}]},
     "messages[0].mood", "unknown field"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000},
     "max_tokens", "context length"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function"}]}, "tools", "not supported"),
])
def test_bad_requests_get_a_400_in_openai_shape(server, path, body, param, words):
    error = assert_openai_error(server.post(path, body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"], error["message"]


def test_the_server_survives_bad_requests(server):
    assert server.proc.poll() is None
    done = server.client().completions.create(model=BASE, prompt=PROMPT, max_tokens=3)
    assert done.usage.completion_tokens == 3


# --- clients that leave, metrics --------------------------------------------------------------------------

def _generated(server) -> float:
    return server.metric("lorakit_generated_tokens_total")


def _assert_freed(server, before: float) -> None:
    """The sequence is gone long before its 1000 tokens, and nothing is generating any more."""
    server.wait_idle(timeout=2.0)
    after = _generated(server)
    time.sleep(0.3)
    assert _generated(server) == after and after - before < 600, (before, after)


def test_a_client_that_disconnects_frees_its_sequence(server):
    server.wait_idle()
    before = _generated(server)
    body = {"model": "alpha", "prompt": PROMPT, "stream": True, **LONG}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # it is generating
    _assert_freed(server, before)

    before = _generated(server)
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        server.post("/v1/completions", {"model": BASE, "prompt": PROMPT, **LONG}, timeout=0.5)
    _assert_freed(server, before)


def test_metrics_count_requests_by_model_and_status(server):
    server.client().completions.create(model="beta", prompt=PROMPT, max_tokens=2)
    server.post("/v1/completions", {"model": "beta", "prompt": ""})
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("lorakit_waiting_requests", "lorakit_running_sequences", "lorakit_tokens_per_second",
                 "lorakit_generated_tokens_total", "lorakit_resident_adapters", "lorakit_requests_total",
                 "lorakit_request_latency_seconds_bucket", "lorakit_time_to_first_token_seconds_bucket"):
        assert name in text, name
    assert server.metric("lorakit_requests_total", '{model="beta",status="200"}') >= 1
    assert server.metric("lorakit_requests_total", '{model="-",status="400"}') >= 1


# --- a full queue, a slow request ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """One sequence at a time, one waiting, one key, requests cut at 0.3 s, the base model renamed."""
    srv = start_server(tmp_path_factory.mktemp("small"), "--api-key", ADMIN_KEY, "--max-running", "1",
                       "--max-queue", "1", "--request-timeout", "0.3", "--served-model-name", "tiny",
                       "--adapter-dtype", "bf16")
    yield srv
    srv.stop()


def test_a_full_queue_answers_429_with_retry_after(small_server):
    assert [m.id for m in small_server.client().models.list().data] == ["tiny"]
    health = httpx.get(f"{small_server.url}/health").json()
    assert health["adapter_dtype"] == "bfloat16"  # --adapter-dtype bf16
    assert health["lora_path"] in ("cpu-kernel", "batched-products")
    responses = []

    def send():
        responses.append(small_server.post("/v1/completions", {"model": "tiny", "prompt": PROMPT, **LONG}))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(r.status_code for r in responses)
    assert 429 in statuses and set(statuses) <= {200, 408, 429}, statuses
    full = next(r for r in responses if r.status_code == 429)
    assert int(full.headers["Retry-After"]) >= 1
    assert assert_openai_error(full, 429)["type"] == "rate_limit_error"
    assert_openai_error(small_server.post("/v1/completions", {"model": "tiny", "prompt": "x"}, key=None), 401)


def test_a_request_past_the_timeout_is_cancelled(small_server):
    small_server.wait_idle()
    started = time.monotonic()
    assert assert_openai_error(small_server.post("/v1/completions", {"model": "tiny", "prompt": PROMPT, **LONG}),
                               408)["code"] == "request_timeout"
    assert time.monotonic() - started < 1.5
    with pytest.raises(openai.APIError, match="limit"):  # a stream ends with an error chunk
        for _ in small_server.client().completions.create(model="tiny", prompt=PROMPT, stream=True, max_tokens=1000,
                                                          extra_body={"ignore_eos": True}):
            pass
    small_server.wait_idle(timeout=3.0)  # the cancel reaches the engine process within a step or two


# --- SIGTERM ----------------------------------------------------------------------------------------------

def test_sigterm_drains_running_requests_then_exits_0(tmp_path):
    srv = start_server(tmp_path, "--max-running", "2", "--drain-timeout", "1.0")
    client = srv.client("none")
    results, streaming = {}, {"long": threading.Event(), "short": threading.Event()}

    def short():  # running when SIGTERM comes, finishes well within the drain timeout (20 steps)
        chunks = []
        for chunk in client.completions.create(model=BASE, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                               stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
            chunks.append(chunk)
            streaming["short"].set()
        results["short"] = chunks[-1].usage.completion_tokens

    def long():  # running too, cannot finish within the drain timeout (1000 steps, >= 1.5 s): aborted
        try:
            for _ in client.completions.create(model=BASE, prompt=PROMPT, stream=True, max_tokens=1000,
                                               extra_body={"ignore_eos": True}):
                streaming["long"].set()
            results["long"] = "finished"
        except openai.APIError as exc:
            results["long"] = str(exc)

    threads = [threading.Thread(target=long), threading.Thread(target=short)]
    threads[0].start()
    assert streaming["long"].wait(30)
    threads[1].start()
    assert streaming["short"].wait(30)  # both are generating
    srv.proc.send_signal(signal.SIGTERM)

    while httpx.get(f"{srv.url}/health").status_code == 200:
        time.sleep(0.01)
    assert httpx.get(f"{srv.url}/health").json() == {"status": "draining"}
    refused = srv.post("/v1/completions", {"model": BASE, "prompt": PROMPT})
    assert assert_openai_error(refused, 503)["code"] == "draining"

    for thread in threads:
        thread.join(timeout=20)
    assert results == {"short": 20, "long": "the server stopped before the request finished"}
    assert srv.proc.wait(timeout=20) == 0
    assert "Traceback" not in srv.stderr.read_text()


# --- the command line -------------------------------------------------------------------------------------

def test_bad_command_lines_get_one_clear_line(tmp_path, adapters):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"k": {"models": "*"}}))
    for flags, words in ((["--adapter", "alpha"], "NAME=DIR"),
                         (["--api-keys", str(keys)], "needs a tenant"),
                         (["--adapter", f"bad={adapters['broken']}"], str(adapters["broken"]))):
        result = subprocess.run([sys.executable, "-m", "lorakit.cli", "serve", "--port", "0", *flags],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("lorakit serve: error:") and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
