"""What a newcomer meets first: a folder that is not an adapter, a hub id on a machine that cannot reach the
hub, and stopping `lorakit serve`. Each refusal is one short line within seconds, names no folder's
contents (over HTTP not even a server-side path), and a stopped server says what it did and exits 0."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from huggingface_hub import constants

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.io.peft_format import resolve_adapter_folder
from lorakit.models import EMBEDDED_MODEL, hub
from test_serve import BASE, PROMPT, assert_openai_error, save_random_adapter, start_server
from test_tenancy import silent_hub  # noqa: F401 (a fixture: a hub that never answers, the slowest offline)

ENTRIES = 46  # what the folder of issue 12 held
FAST_SECONDS = 15  # huggingface_hub's own retries took ~48 s; this bound catches them, it is no benchmark
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def offline(monkeypatch, tmp_path, silent_hub):
    """This process behind the silent hub, with an empty hub cache of its own; the hub probe forgotten."""
    monkeypatch.setattr(constants, "ENDPOINT", silent_hub)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_last_probe", (float("-inf"), False))
    return tmp_path / "hf"


def cache_repo(hf_home: Path, kind: str, repo_id: str, source: Path) -> None:
    """Put `source`'s files in the hub cache under HF_HOME as if `repo_id` had been downloaded."""
    repo = hf_home / "hub" / f"{kind}s--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / FAKE_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_COMMIT)


def offline_env(hf_home: Path, endpoint: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home)}


def lorakit_cli(*args: str, env: dict) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "lorakit.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)
    return done.returncode, done.stderr, time.monotonic() - started


def folder_of_files(folder: Path) -> Path:
    folder.mkdir()
    for i in range(ENTRIES):
        (folder / f"entry{i:02d}").mkdir()
    return folder


# --- a folder that is not an adapter ------------------------------------------------------------------------

def test_a_folder_that_is_not_an_adapter_is_one_short_line(tmp_path):
    plain = folder_of_files(tmp_path / "plain")
    with pytest.raises(AdapterFileError) as refused:
        resolve_adapter_folder(plain)
    message = str(refused.value)
    assert "\n" not in message and len(message) < 300, message
    assert str(plain) in message and "adapter_config.json" in message and "adapter_model.safetensors" in message
    assert "entry" not in message

    runs = folder_of_files(tmp_path / "runs")
    for i in range(ENTRIES):
        (runs / f"entry{i:02d}" / "adapter_config.json").write_text("{}")
    message = str(pytest.raises(AdapterFileError, resolve_adapter_folder, runs).value)
    assert "several adapters (entry00, entry01, entry02 and 43 more)" in message and "entry03" not in message

    pickled = save_random_adapter(tmp_path / "pickled", 0)
    (pickled / "adapter_model.safetensors").unlink()
    for i in range(ENTRIES):
        (pickled / f"checkpoint{i:02d}.bin").write_bytes(b"")
    message = str(pytest.raises(AdapterFileError, lorakit.Adapter.read, pickled).value)
    assert "checkpoint00.bin, checkpoint01.bin, checkpoint02.bin and 43 more" in message, message


def test_serve_refuses_a_non_adapter_folder_in_one_line_before_loading_the_model(tmp_path):
    plain = folder_of_files(tmp_path / "plain")
    status, stderr, _ = lorakit_cli("serve", "--port", "0", "--adapter", f"bad={plain}", env=dict(os.environ))
    assert status == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"lorakit serve: error: --adapter bad={plain}: {plain} is not an adapter folder")


# --- a hub id on a machine that cannot reach the hub --------------------------------------------------------

def test_an_unreachable_hub_fails_in_seconds_with_one_clear_line(tmp_path, silent_hub):
    status, stderr, seconds = lorakit_cli("generate", "--model", "nobody/no-such-model-xyz", "hi",
                                          env=offline_env(tmp_path / "hf", silent_hub))
    assert status == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("lorakit generate: error: nobody/no-such-model-xyz: no such local folder, the Hugging "
                             f"Face hub ({silent_hub}) could not be reached")
    assert "pass a local folder" in stderr and "HF_HUB_OFFLINE=1" in stderr
    assert seconds < FAST_SECONDS, f"{seconds:.1f} s"


def test_a_model_in_the_local_cache_still_loads_without_the_hub(tmp_path, silent_hub):
    cache_repo(tmp_path / "hf", "model", "someone/cached-model", EMBEDDED_MODEL)
    status, stderr, _ = lorakit_cli("generate", "--model", "someone/cached-model", "--max-new-tokens", "3", "To be",
                                    env=offline_env(tmp_path / "hf", silent_hub))
    assert status == 0, stderr


def test_an_adapter_hub_id_offline_loads_from_the_cache_or_says_why_not(tmp_path, offline):
    cache_repo(offline, "model", "someone/cached-adapter", save_random_adapter(tmp_path / "adapter", 1))
    assert lorakit.Adapter.read("someone/cached-adapter").config.r == 8

    started = time.monotonic()
    with pytest.raises(lorakit.LorakitError, match="could not be reached, and the local cache .* does not hold it"):
        lorakit.Adapter.read("nobody/no-such-adapter")
    assert time.monotonic() - started < FAST_SECONDS


# --- runtime loads over HTTP, and stopping ------------------------------------------------------------------

def test_runtime_loads_name_no_server_folder_and_an_unreachable_hub_is_a_quick_503(tmp_path, silent_hub):
    root = tmp_path / "root"
    save_random_adapter(root / "good", 2)
    folder_of_files(root / "plain")
    runs = folder_of_files(root / "runs")
    save_random_adapter(runs / "entry00", 3)
    cache_repo(tmp_path / "hf", "model", "someone/cached-adapter", root / "good")
    srv = start_server(tmp_path, "--allow-runtime-loading", "--adapter-root", str(root), "--allow-hub-downloads",
                       env=offline_env(tmp_path / "hf", silent_hub))
    try:
        def load(name, path, **extra):
            return srv.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path, **extra})

        for path in ("plain", "runs", str(runs), "no-such-folder"):
            error = assert_openai_error(load("x", path), 404)
            assert error["message"] == (f"no adapter folder {path!r} under this server's adapter roots (an adapter "
                                        "folder holds adapter_config.json and adapter_model.safetensors)")
        assert load("good", "good").status_code == 200

        started = time.monotonic()
        missing = assert_openai_error(load("remote", "nobody/no-such-adapter", lora_source="hub"), 503)
        assert missing["code"] == "hub_unavailable" and time.monotonic() - started < FAST_SECONDS
        assert str(tmp_path) not in missing["message"]
        assert load("cached", "someone/cached-adapter", lora_source="hub").status_code == 200

        srv.proc.send_signal(signal.SIGINT)  # the operator's Ctrl-C: drained and stopped as SIGTERM is
        assert srv.proc.wait(timeout=30) == 0
    finally:
        srv.stop()
    stderr = srv.stderr.read_text()
    assert "lorakit serve: Ctrl-C: draining 0 in-flight requests (up to 30 s; Ctrl-C again to stop at once) ...\n" \
           "lorakit serve: stopped\n" in stderr, stderr


def test_sigterm_drains_the_in_flight_request_and_says_so(tmp_path):
    srv = start_server(tmp_path, "--drain-timeout", "30")
    finished, first_chunk = {}, threading.Event()

    def stream():
        chunks = srv.client("none").completions.create(model=BASE, prompt=PROMPT, max_tokens=1000, temperature=0,
                                                         stream=True, stream_options={"include_usage": True},
                                                         extra_body={"ignore_eos": True})
        for chunk in chunks:
            first_chunk.set()
            finished["tokens"] = chunk.usage.completion_tokens if chunk.usage else None

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert first_chunk.wait(30)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=60) == 0
        thread.join(timeout=10)
    finally:
        srv.stop()
    assert finished == {"tokens": 1000}  # drained: it ran to its end
    stderr = srv.stderr.read_text()
    assert "lorakit serve: SIGTERM: draining 1 in-flight request (up to 30 s) ...\nlorakit serve: stopped\n" in stderr
    assert "Traceback" not in stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/health")
