"""`lorakit serve`'s engine runs in a process of its own: it gives the same tokens as the engine in
process, and a server whose engine process dies says so on /health and answers every request at once."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import psutil
import pytest

from lorakit.engine import Engine, EngineConfig, SamplingParams
from lorakit.engine.engine import auto_threads
from lorakit.engine.remote import BEAT_SECONDS, EngineProcess
from lorakit.errors import ConfigError
from lorakit.models import load_model, load_tokenizer
from test_serve import BASE, PROMPT, save_random_adapter, start_server


def until(read, wanted, seconds: float = 10 * BEAT_SECONDS):
    """read() once it returns `wanted`, or its last value after `seconds` (what the heartbeat brings)."""
    deadline = time.monotonic() + seconds
    value = read()
    while value != wanted and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


def test_the_engine_process_gives_the_tokens_of_the_engine_in_process(tmp_path):
    folders = [save_random_adapter(tmp_path / f"a{i}", seed=i) for i in range(3)]
    tokenizer = load_tokenizer(None)
    prompts = [tokenizer(PROMPT)["input_ids"], tokenizer("Reverse the words: king night sword\nAnswer:")["input_ids"]]
    requests = [(p, name) for p in prompts for name in (None, "a0", "a1", "a2")]
    greedy = SamplingParams(max_tokens=24, temperature=0)

    local = Engine(EngineConfig(dtype="fp32"))
    for i, folder in enumerate(folders):
        local.add_adapter(f"a{i}", folder)
    handles = [local.submit(p, greedy, name) for p, name in requests]
    local.run_until_idle()
    expected = [h.result().token_ids for h in handles]

    remote = EngineProcess(EngineConfig(dtype="fp32"))
    try:
        for i, folder in enumerate(folders):
            remote.add_adapter(f"a{i}", folder)

        async def all_requests():
            async def one(prompt, name):
                tokens = []
                async for event in remote.submit(prompt, greedy, name).stream():
                    tokens += event.token_ids
                return tokens
            return await asyncio.gather(*(one(p, name) for p, name in requests))

        assert asyncio.run(all_requests()) == expected  # all together, batched with one another
        assert remote.stats().generated_tokens_total == sum(len(t) for t in expected)
        resident = until(lambda: {a.name for a in remote.adapters() if a.resident}, {"a0", "a1", "a2"})
        assert resident == {"a0", "a1", "a2"}  # residency comes with the engine's heartbeat
    finally:
        remote.shutdown(5)
    assert remote.health()[0] == "dead"


def test_a_server_whose_engine_process_dies_says_so_and_answers_at_once(tmp_path):
    server = start_server(tmp_path)
    try:
        engine = next(c for c in psutil.Process(server.proc.pid).children() if "spawn_main" in " ".join(c.cmdline()))
        engine.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (health := httpx.get(f"{server.url}/health")).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"] == "dead"
        started = time.monotonic()
        answer = server.post("/v1/completions", {"model": BASE, "prompt": PROMPT, "max_tokens": 4})
        assert answer.status_code == 503 and "engine process" in answer.json()["error"]["message"]
        assert time.monotonic() - started < 5
    finally:
        server.stop()
        if server.proc.poll() is None:
            server.proc.kill()
    assert "Traceback" not in server.stderr.read_text()


def test_the_engine_process_sizes_its_threads_to_the_model():
    assert auto_threads(load_model(None)) == 1  # 5.7M parameters: one thread decodes fastest
    with pytest.raises(ConfigError, match="engine-threads"):
        EngineConfig(threads=0)
