"""`lorakit serve`'s front door against real servers on loopback: no request, however malformed, slow,
large or cross-site, fails another request, gets a 5xx, or stalls the server. Raw sockets play the slow
clients; schemathesis fuzzes the OpenAPI document the server publishes."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import torch
from test_serve import ADMIN_KEY, BASE, PROMPT, assert_openai_error, start_server
from uvicorn import Config
from uvicorn.server import ServerState

from lorakit.engine.sampling import SamplingParams, choose_next_tokens
from lorakit.serve.connections import BoundedH11Protocol

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Default limits, one extra host name and one CORS origin."""
    srv = start_server(tmp_path_factory.mktemp("door"), "--api-key", ADMIN_KEY, "--max-running", "4",
                       "--allowed-hosts", "models.internal", "--cors-origin", "https://app.example")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.stderr.read_text()


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """Short header and body deadlines, four connections, 4 KiB bodies, no CORS."""
    srv = start_server(tmp_path_factory.mktemp("tight"), "--api-key", ADMIN_KEY, "--header-timeout", "1",
                       "--body-timeout", "1", "--max-connections", "4", "--max-request-bytes", "4096")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.stderr.read_text()


def post_raw(server, path: str, body: bytes, headers: dict = JSON, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=timeout)


def connect(server) -> socket.socket:
    address = urlparse(server.url)
    return socket.create_connection((address.hostname, address.port), timeout=10)


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def raw_status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def raw_error(response: bytes) -> dict:
    return json.loads(response.partition(b"\r\n\r\n")[2])["error"]


def greedy_text(server, max_tokens: int = 24, **settings) -> str:
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, **settings}
    response = server.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


# --- sampling parameters -----------------------------------------------------------------------------------

def test_edge_sampling_values_answer_sanely_while_a_neighbour_completes(server):
    """A temperature too small to divide by decodes greedily (as vLLM does below 1e-5), a top_p that rounds
    to 0 keeps the most likely token, and non-numbers are 400s; a request batched alongside is unharmed."""
    expected = greedy_text(server, max_tokens=300, temperature=0)
    neighbour = {}
    thread = threading.Thread(target=lambda: neighbour.update(text=greedy_text(server, max_tokens=300, temperature=0)))
    thread.start()
    greedy = greedy_text(server, temperature=0)
    assert greedy_text(server, temperature=1e-40) == greedy
    assert greedy_text(server, temperature=1.0, top_p=5e-324, seed=7) == greedy  # only the top token is left
    for raw in (b'"temperature": NaN', b'"temperature": Infinity', b'"top_p": -Infinity', b'"top_p": NaN'):
        body = b'{"model": "%s", "prompt": "x", %s}' % (BASE.encode(), raw)
        error = assert_openai_error(post_raw(server, "/v1/completions", body), 400)
        assert error["param"] in ("temperature", "top_p") and "finite" in error["message"]
    thread.join(timeout=60)
    assert neighbour["text"] == expected


def test_a_sampled_row_that_is_not_a_distribution_does_not_fail_its_batch():
    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")  # what a broken model step would give
    params = [SamplingParams(temperature=1e-40), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=1.0, top_p=5e-324, seed=2)]
    assert params[0].greedy and not params[2].greedy
    assert choose_next_tokens(logits, params, [p.generator() for p in params]) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"max_tokens": 10**30}, "max_tokens"),
    ("/v1/completions", {"max_tokens": 1025}, "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": 5000}, "max_completion_tokens"),
    ("/v1/chat/completions", {"max_tokens": 2**63}, "max_tokens"),
])
def test_max_tokens_past_the_context_is_a_400_naming_the_field(server, path, body, param):
    request = {"model": BASE, **({"prompt": PROMPT} if "chat" not in path else
                                 {"messages": [{"role": "user", "content": "hi"}]}), **body}
    error = assert_openai_error(server.post(path, request), 400)
    assert error["param"] == param and "context length of 1024" in error["message"], error


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("body, param", [
    (DEEP, None),
    (b'{"model": "m", "prompt": "x", "logit_bias": ' + DEEP + b"}", None),
    (b'{"model": "%s", "prompt": "\\ud800x"}' % BASE.encode(), "prompt"),
    (b'{"model": "%s", "prompt": "x", "stop": ["\\udfff"]}' % BASE.encode(), "stop"),
    (b'{"model": "\\ud800", "prompt": "x"}', "model"),
    (b'{"model": "%s", "prompt": "x", "\\ud800": 1}' % BASE.encode(), None),
    (b'{"model": "%s", "prompt": "x", "max_tokens": 1e400}' % BASE.encode(), "max_tokens"),
    (b'{"model": "%s", "prompt": "x", "max_tokens": 1%s}' % (BASE.encode(), b"0" * 5000), None),
    (b'{"model": "%s", "prompt": "x", "seed": 18446744073709551616}' % BASE.encode(), "seed"),
    (b'{"model": "%s", "prompt": "x", "seed": -9223372036854775809}' % BASE.encode(), "seed"),
    (b'{"model": "%s", "prompt": [5, -1]}' % BASE.encode(), "prompt"),
    (b'{"model": "%s", "prompt": [5, 1.5]}' % BASE.encode(), "prompt"),
    (b'{"model": "%s", "prompt": "x", "stop": ["%s"]}' % (BASE.encode(), b"z" * 257), "stop"),
    (b'{"model": "%s", "prompt": "x", "stop": %s}' % (BASE.encode(), json.dumps(["s"] * 17).encode()), "stop"),
    (b'{"model": "%s", "prompt": "x", "top_k": -2}' % BASE.encode(), "top_k"),
])
def test_malformed_completions_are_400s(server, body, param):
    assert assert_openai_error(post_raw(server, "/v1/completions", body), 400)["param"] == param


@pytest.mark.parametrize("content", ['"\\ud800"', '[{"type": "text", "text": "a\\udbff"}]', '[{"type": "image"}]'])
def test_malformed_chat_messages_are_400s(server, content):
    body = b'{"model": "%s", "messages": [{"role": "user", "content": %s}]}' % (BASE.encode(), content.encode())
    assert assert_openai_error(post_raw(server, "/v1/chat/completions", body), 400)["param"] == "messages[0].content"


def test_the_server_is_well_after_malformed_requests(server):
    assert server.proc.poll() is None
    assert greedy_text(server, max_tokens=3, temperature=0)


# --- bounded work per request ------------------------------------------------------------------------------

def test_health_answers_while_a_2_mb_prompt_is_tokenized(server):
    prompt = "All the world's a stage, and all the men and women merely players. " * 30_000  # ~2 MB
    body = json.dumps({"model": BASE, "prompt": prompt, "max_tokens": 1}).encode()
    assert len(body) < 2 * 1024 * 1024
    answer, slowest, polls = {}, 0.0, 0

    def send():
        answer["response"] = post_raw(server, "/v1/completions", body)

    thread = threading.Thread(target=send)
    thread.start()
    while thread.is_alive():
        started = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        slowest, polls = max(slowest, time.monotonic() - started), polls + 1
        time.sleep(0.05)
    assert polls >= 5 and slowest < 1.0, (polls, slowest)  # the prompt took a while, /health never did
    assert "context length" in assert_openai_error(answer["response"], 400)["message"]


def test_a_body_past_the_limit_is_refused_with_413(server, tight):
    sock = connect(server)  # a Content-Length past 2 MiB: refused before a byte of the body is read
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer %s\r\nContent-Length: 3000000\r\n\r\n" % ADMIN_KEY.encode())
    response = read_until_closed(sock)
    assert raw_status(response) == 413 and raw_error(response)["code"] == "request_too_large"

    sock = connect(tight)  # a chunked body is counted as it arrives (the limit here is 4 KiB)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer %s\r\nTransfer-Encoding: chunked\r\n\r\n" % ADMIN_KEY.encode())
    for _ in range(5):
        sock.sendall(b"400\r\n" + b" " * 1024 + b"\r\n")
    response = read_until_closed(sock)
    assert raw_status(response) == 413 and "4096 bytes" in raw_error(response)["message"]
    fits = tight.post("/v1/completions", {"model": BASE, "prompt": PROMPT * 50, "max_tokens": 1})  # ~2.3 KB
    assert fits.status_code == 200, fits.text


def test_a_large_body_refused_before_it_is_read_still_gets_its_answer(server):
    body = json.dumps({"model": BASE, "prompt": "x " * 700_000}).encode()  # 1.4 MB, read and dropped by uvicorn
    with httpx.Client(timeout=30) as client:
        for _ in range(3):  # and the connection stays usable
            refused = client.post(f"{server.url}/v1/completions", content=body,
                                  headers={"Authorization": "Bearer wrong", "Content-Type": "application/json"})
            assert assert_openai_error(refused, 401)["code"] == "invalid_api_key"
            refused = client.post(f"{server.url}/v1/completions", content=body, headers={**AUTH})
            assert assert_openai_error(refused, 415)["code"] == "unsupported_media_type"
        assert client.get(f"{server.url}/v1/models", headers=AUTH).status_code == 200


# --- slow clients and connection floods --------------------------------------------------------------------

def test_a_stalled_request_line_is_closed_while_health_answers(tight):
    sock = connect(tight)
    sock.sendall(b"POST /v1/compl")  # half a request line, then nothing
    idle = connect(tight)  # and a connection that never says anything
    started = time.monotonic()
    assert httpx.get(f"{tight.url}/health", timeout=5).status_code == 200
    response = read_until_closed(sock)
    assert raw_status(response) == 408 and raw_error(response)["code"] == "header_timeout"
    assert read_until_closed(idle) == b""
    assert 0.8 < time.monotonic() - started < 3.0


@pytest.mark.parametrize("request_bytes", [
    b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Bad: a\x00b\r\n\r\n",  # a NUL in a header
    b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20_000,  # 16 KiB of headers, still going
])
def test_bytes_that_are_not_http_get_a_400_in_openai_shape(tight, request_bytes):
    sock = connect(tight)
    sock.sendall(request_bytes)
    response = read_until_closed(sock)
    assert raw_status(response) == 400 and raw_error(response)["code"] == "invalid_http"


def test_a_stalled_body_gets_408(tight):
    sock = connect(tight)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer %s\r\nContent-Length: 100\r\n\r\n{\"model\": " % ADMIN_KEY.encode())
    started = time.monotonic()
    response = read_until_closed(sock)
    assert raw_status(response) == 408 and raw_error(response)["code"] == "body_timeout"
    assert 0.8 < time.monotonic() - started < 3.0


def test_connections_past_the_cap_get_503_until_some_close(tight):
    idle = [connect(tight) for _ in range(4)]
    time.sleep(0.2)  # accepted, and well within the 1 s header timeout
    refused = httpx.get(f"{tight.url}/v1/models", headers=AUTH, timeout=5)
    assert assert_openai_error(refused, 503)["code"] == "too_many_connections"
    assert refused.headers["Retry-After"] == "1"
    for sock in idle:
        sock.close()
    time.sleep(0.2)
    assert httpx.get(f"{tight.url}/v1/models", headers=AUTH, timeout=5).status_code == 200


# --- browsers ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("host, status", [
    ("evil.example", 400), ("evil.example:8000", 400), ("localhost.evil.example", 400),
    ("models.internal", 200), ("MODELS.internal:9000", 200), ("localhost:1234", 200), ("127.0.0.1", 200),
    ("[::1]:8000", 200), ("10.1.2.3:80", 200),
])
def test_the_host_header_must_name_this_server(server, host, status):
    for path in ("/health", "/metrics", "/v1/models"):
        response = httpx.get(f"{server.url}{path}", headers={**AUTH, "Host": host}, timeout=10)
        if status == 400:
            assert assert_openai_error(response, 400)["code"] == "host_not_allowed"
        else:
            assert response.status_code == 200, (path, response.text)


def test_cors_headers_only_for_the_named_origins(server, tight):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = httpx.options(f"{server.url}/v1/completions", headers=preflight, timeout=10)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = {**preflight, "Origin": "https://evil.example"}
    assert "access-control-allow-origin" not in httpx.options(f"{server.url}/v1/completions", headers=other).headers
    listed = httpx.get(f"{server.url}/v1/models", headers={**AUTH, "Origin": "https://app.example"})
    assert listed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in httpx.get(f"{server.url}/v1/models",
                                                         headers={**AUTH, "Origin": "https://evil.example"}).headers
    for response in (httpx.options(f"{tight.url}/v1/completions", headers=preflight),  # no --cors-origin: none
                     httpx.get(f"{tight.url}/v1/models", headers={**AUTH, "Origin": "https://app.example"})):
        assert not any(name.startswith("access-control-") for name in response.headers)


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_a_post_that_is_not_json_is_refused_with_415(server, content_type):
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
                       ("/v1/completions", {"model": BASE, "prompt": PROMPT, "max_tokens": 1})):
        response = httpx.post(f"{server.url}{path}", content=json.dumps(body), headers=headers, timeout=10)
        assert assert_openai_error(response, 415)["code"] == "unsupported_media_type"
    fine = httpx.post(f"{server.url}/v1/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": 1},
                      headers={**AUTH, "Content-Type": "application/json; charset=utf-8"}, timeout=30)
    assert fine.status_code == 200


# --- the OpenAPI document ----------------------------------------------------------------------------------

def test_the_openapi_document_lists_what_the_server_answers(server):
    doc = httpx.get(f"{server.url}/openapi.json").json()
    statuses = {(method, path): set(operation["responses"]) for path, operations in doc["paths"].items()
                for method, operation in operations.items()}
    every = {"200", "400", "408", "413", "500", "503"}
    assert statuses[("get", "/health")] == statuses[("get", "/metrics")] == every
    assert statuses[("get", "/v1/models")] == every | {"401"}
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert statuses[("post", path)] == every | {"401", "403", "404", "409", "415", "429"}
    assert statuses[("post", "/v1/load_lora_adapter")] == every | {"401", "403", "404", "409", "415"}
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(doc["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]) == {"application/json",
                                                                                          "text/event-stream"}
    error = doc["paths"]["/v1/load_lora_adapter"]["post"]["responses"]["400"]["content"]["application/json"]
    assert error["schema"]["$ref"].endswith("/ErrorResponse")
    schemas = doc["components"]["schemas"]
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert [p["type"] for p in prompt] == ["string", "array"] and prompt[1]["items"]["type"] == "integer"
    stop = schemas["CompletionRequest"]["properties"]["stop"]["anyOf"]
    assert [s["type"] for s in stop] == ["string", "array", "null"] and stop[1]["maxItems"] == 16
    content = schemas["ChatMessage"]["properties"]["content"]["anyOf"]
    assert [c["type"] for c in content] == ["string", "array"]
    assert "422" not in json.dumps(doc) and "HTTPValidationError" not in schemas


def test_schemathesis_finds_no_server_error(tmp_path):
    """Fuzz every operation of the published document on a keyed server; bounded to about a quarter of a minute."""
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"{ADMIN_KEY}:\n  tenant: ops\n  models: '*'\n  can_load_adapters: true\n")
    srv = start_server(tmp_path, "--api-keys", str(keys), "--max-model-len", "64", "--request-timeout", "5")
    try:
        result = subprocess.run(
            [st, "run", f"{srv.url}/openapi.json", "--header", f"Authorization: Bearer {ADMIN_KEY}",
             "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                         "response_schema_conformance",
             "--max-examples", "25", "--max-time", "15", "--seed", "1", "--workers", "1", "--no-color",
             "--generation-with-security-parameters", "false", "--request-timeout", "30"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        assert srv.proc.poll() is None
    finally:
        srv.stop()
    assert "Traceback" not in srv.stderr.read_text()


# --- the command line --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--max-connections", "0"], ["--body-timeout", "-2"]])
def test_bad_limits_get_one_clear_line(flags):
    result = subprocess.run([sys.executable, "-m", "lorakit.cli", "serve", "--port", "0", *flags],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("lorakit serve: error:"), result.stderr
    assert flags[0] in result.stderr and result.stderr.count("\n") == 1


def test_every_connection_sends_without_waiting_for_acknowledgements():
    """TCP_NODELAY on each accepted connection, on a listening socket bound as the server binds it (protocol
    number 0, on which asyncio does not set it): else a response written in two parts waits for the client's
    delayed acknowledgement, 40 ms on every request after the first of a kept-alive connection."""
    async def app(scope, receive, send):  # never called: the test only connects
        raise AssertionError

    async def accepted_socket_options() -> tuple[int, int]:
        config = Config(app)
        config.load()
        protocols = []

        def protocol():
            protocols.append(BoundedH11Protocol(config=config, server_state=ServerState(), app_state={},
                                                header_timeout=5.0))
            return protocols[-1]

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        server = await asyncio.get_running_loop().create_server(protocol, sock=listener)
        _, writer = await asyncio.open_connection(*listener.getsockname())
        while not protocols:
            await asyncio.sleep(0.01)
        accepted = protocols[0].transport.get_extra_info("socket")
        options = listener.proto, accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
        server.close()
        return options

    listener_protocol, nodelay = asyncio.run(accepted_socket_options())
    assert listener_protocol == 0 and nodelay
