"""`lorakit.Adapter`, the one reader of adapter folders: hostile files are refused cheaply and by name, the
training side (`load_adapter`) and the serving side (`Engine.add_adapter`, the HTTP server) refuse the same
files, and an adapter's digest names exactly its bytes. Real files on disk, the embedded model."""

from __future__ import annotations

import copy
import json
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit import Adapter
from lorakit.engine import Engine, EngineConfig
from lorakit.errors import AdapterFileError
from lorakit.models import load_model, load_tokenizer
from test_serve import BASE, PROMPT, assert_openai_error, start_server

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
NESTED = 100_000  # far past Python's recursion limit


@pytest.fixture(scope="module")
def model():
    return load_model(None)


@pytest.fixture(scope="module")
def good(model, tmp_path_factory) -> Path:
    """A rank-4 adapter on q_proj and v_proj with nonzero B, so it changes the output."""
    model = copy.deepcopy(model)
    torch.manual_seed(0)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return lorakit.save_adapter(model, tmp_path_factory.mktemp("good") / "adapter")


@pytest.fixture(scope="module")
def engine(model):
    return Engine(EngineConfig(dtype="fp32", max_model_len=128), model=copy.deepcopy(model),
                  tokenizer=load_tokenizer(None))


def config_text(good: Path, **changes) -> str:
    data = json.loads((good / CONFIG).read_text())
    return json.dumps({**data, **changes}, indent=2)


def write_adapter(folder: Path, config: str, weights: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(config)
    (folder / WEIGHTS).write_bytes(weights)
    return folder


def raw_safetensors(entries: list[tuple[str, dict]], data: bytes) -> bytes:
    """A safetensors file whose header holds `entries` exactly as given: keys may repeat, offsets may lie."""
    header = "{" + ",".join(f"{json.dumps(key)}:{json.dumps(info)}" for key, info in entries) + "}"
    return struct.pack("<Q", len(header)) + header.encode() + data


def end_to_end(tensors: list[tuple[str, torch.Tensor]]) -> tuple[list[tuple[str, dict]], bytes]:
    """Header entries and data for fp32 `tensors` laid one after another, as a writer would."""
    entries, data = [], b""
    for key, tensor in tensors:
        raw = tensor.float().contiguous().numpy().tobytes()
        entries.append((key, {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [len(data),
                                                                                               len(data) + len(raw)]}))
        data += raw
    return entries, data


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --- refused before the data is read ------------------------------------------------------------------------

def test_weights_above_the_size_cap_are_refused_before_a_byte_of_them_is_read(good, tmp_path):
    folder = tmp_path / "huge"
    folder.mkdir()
    (folder / CONFIG).write_text((good / CONFIG).read_text())
    weights = folder / WEIGHTS
    with weights.open("wb") as handle:  # a real header, then a hole up to 4 GiB: only the size is wrong
        handle.write((good / WEIGHTS).read_bytes()[:1024])
        handle.truncate(4 << 30)
    peak, started = peak_rss_bytes(), time.monotonic()
    with pytest.raises(AdapterFileError) as refused:
        Adapter.read(folder, max_bytes=10**8)
    assert time.monotonic() - started < 5
    assert peak_rss_bytes() - peak < 1 << 30
    message = str(refused.value)
    assert str(weights) in message and "4,294,967,296 bytes" in message and "100,000,000" in message


def test_a_config_field_given_twice_is_refused_by_name(good, tmp_path):
    text = (good / CONFIG).read_text().replace('"r": 4,', '"r": 4, "r": 64,')
    folder = write_adapter(tmp_path / "twice", text, (good / WEIGHTS).read_bytes())
    with pytest.raises(AdapterFileError, match=r"adapter_config.json: the key 'r' appears twice"):
        Adapter.read(folder)


def test_a_tensor_key_given_twice_in_the_header_is_refused(good, tmp_path):
    a = Adapter.read(good)
    key = f"{Q0}.lora_A.weight"
    entries, data = end_to_end([(key, a.tensors[key]), (key, a.tensors[key])])
    folder = write_adapter(tmp_path / "twice", (good / CONFIG).read_text(), raw_safetensors(entries, data))
    with pytest.raises(AdapterFileError, match=rf"{WEIGHTS}: .*the key '{key}' appears twice"):
        Adapter.read(folder)
    # found in time linear in the header: a header may name millions of (empty) tensors
    empty = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    entries = [(f"t{i}", empty) for i in range(100_000)] + [("t0", empty)]
    folder = write_adapter(tmp_path / "many", (good / CONFIG).read_text(), raw_safetensors(entries, b""))
    started = time.monotonic()
    with pytest.raises(AdapterFileError, match="the key 't0' appears twice"):
        Adapter.read(folder)
    assert time.monotonic() - started < 10


def test_a_key_spelled_with_and_without_the_prefix_is_refused(good, model, tmp_path):
    tensors = dict(Adapter.read(good).tensors)
    key = f"{Q0}.lora_B.weight"
    tensors[key.removeprefix("base_model.model.")] = tensors[key] + 1
    folder = tmp_path / "two-spellings"
    write_adapter(folder, (good / CONFIG).read_text(), b"")
    save_file(tensors, str(folder / WEIGHTS))
    with pytest.raises(AdapterFileError, match="a second tensor for model.layers.0.self_attn.q_proj B"):
        Adapter.read(folder)
    # a modules_to_save weight too: otherwise whichever spelling came last would silently win
    saved = dict(Adapter.read(good).tensors)
    saved["base_model.model.lm_head.weight"] = model.lm_head.weight.detach().clone()
    saved["lm_head.weight"] = model.lm_head.weight.detach() + 1
    folder = tmp_path / "saved-twice"
    write_adapter(folder, config_text(good, modules_to_save=["lm_head"]), b"")
    save_file(saved, str(folder / WEIGHTS))
    with pytest.raises(AdapterFileError, match="a second tensor for lm_head.weight"):
        Adapter.read(folder)


def test_deeply_nested_json_is_an_adapter_error_not_a_crash(good, tmp_path):
    nested = "[" * NESTED + "]" * NESTED
    folder = write_adapter(tmp_path / "config", '{"r": ' + nested + "}", (good / WEIGHTS).read_bytes())
    with pytest.raises(AdapterFileError, match=f"{CONFIG}: the JSON is nested too deeply"):
        Adapter.read(folder)
    header = ('{"x": ' + nested + "}").encode()
    folder = write_adapter(tmp_path / "header", (good / CONFIG).read_text(), struct.pack("<Q", len(header)) + header)
    with pytest.raises(AdapterFileError, match=f"{WEIGHTS}: the safetensors header is nested too deeply"):
        Adapter.read(folder)


@pytest.mark.parametrize("second", [[4, 12], [12, 20]], ids=["overlap", "gap"])
def test_tensors_that_overlap_or_leave_a_gap_are_refused(good, tmp_path, second):
    info = {"dtype": "F32", "shape": [2]}
    entries = [(f"{Q0}.lora_A.weight", {**info, "data_offsets": [0, 8]}),
               (f"{Q0}.lora_B.weight", {**info, "data_offsets": second})]
    weights = raw_safetensors(entries, bytes(second[1]))
    folder = write_adapter(tmp_path / "layout", (good / CONFIG).read_text(), weights)
    with pytest.raises(AdapterFileError, match="with no gap or overlap"):
        Adapter.read(folder)


# --- training and serving refuse the same files -------------------------------------------------------------

def test_load_adapter_and_the_engine_refuse_the_same_files(good, model, engine, tmp_path):
    assert engine.add_adapter("good", good).digest == Adapter.read(good).digest  # the engine takes a good one
    unselected = write_adapter(tmp_path / "unselected", config_text(good, target_modules=["q_proj"]),
                               (good / WEIGHTS).read_bytes())
    a = Adapter.read(good)
    key = f"{Q0}.lora_A.weight"
    entries, data = end_to_end([(k, t) for k, t in a.tensors.items()] + [(key, a.tensors[key])])
    twice = write_adapter(tmp_path / "twice", (good / CONFIG).read_text(), raw_safetensors(entries, data))
    for folder, words in ((unselected, "v_proj' is not selected by target_modules"), (twice, "appears twice")):
        with pytest.raises(AdapterFileError, match=words):
            lorakit.load_adapter(copy.deepcopy(model), folder)
        with pytest.raises(AdapterFileError, match=words):
            engine.add_adapter(folder.name, folder)
        assert folder.name not in {info.name for info in engine.adapters()}


def test_an_absurd_scale_is_refused_at_read_time_and_over_http(good, tmp_path):
    root = tmp_path / "root"
    write_adapter(root / "loud", config_text(good, lora_alpha=1e300), (good / WEIGHTS).read_bytes())
    write_adapter(root / "fine", (good / CONFIG).read_text(), (good / WEIGHTS).read_bytes())
    with pytest.raises(AdapterFileError, match=r"scale 2\.5e\+299 .*lora_alpha / r"):
        Adapter.read(root / "loud")
    beyond = write_adapter(tmp_path / "beyond", config_text(good, lora_alpha=10**400), (good / WEIGHTS).read_bytes())
    with pytest.raises(AdapterFileError, match="lora_alpha must be a finite number"):  # no float holds it
        Adapter.read(beyond)
    key = "adapter-test-key"
    server = start_server(tmp_path, "--api-key", key, "--allow-runtime-loading", "--adapter-root", str(root))
    try:
        def load(name):
            return server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": name}, key=key)

        assert "scale" in assert_openai_error(load("loud"), 400)["message"]
        assert load("fine").status_code == 200
        for model_name in (BASE, "fine"):
            done = server.post("/v1/completions", {"model": model_name, "prompt": PROMPT, "max_tokens": 2}, key=key)
            assert done.status_code == 200, done.text
        listed = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]
        assert {m["id"] for m in listed} == {BASE, "fine"}
    finally:
        server.stop()
    assert server.proc.returncode == 0 and "Traceback" not in server.stderr.read_text()


# --- identity -------------------------------------------------------------------------------------------------

def test_the_digest_names_the_bytes(good, tmp_path):
    first, again = Adapter.read(good), Adapter.read(good)
    assert first.digest == again.digest and first.digest.startswith("sha256:")
    data = bytearray((good / WEIGHTS).read_bytes())
    data[-4] ^= 1  # the lowest mantissa bit of the last value: still a valid, finite adapter
    changed = write_adapter(tmp_path / "changed", (good / CONFIG).read_text(), bytes(data))
    assert Adapter.read(changed).digest != first.digest
    made = Adapter.from_tensors(first.config, first.tensors)
    assert Adapter.read(made.save(tmp_path / "copy")).digest == made.digest


def test_an_adapter_value_is_read_only(good):
    adapter = Adapter.read(good)
    with pytest.raises(TypeError):
        adapter.tensors[f"{Q0}.lora_A.weight"] = torch.zeros(4, 64)
    with pytest.raises(TypeError):
        adapter.modules["model.layers.0.self_attn.q_proj"] = None


def test_loading_the_value_or_the_folder_gives_the_same_logits(good, model):
    ids = load_tokenizer(None)(PROMPT, return_tensors="pt")["input_ids"]
    logits = []
    for source in (good, Adapter.read(good), None):
        copied = copy.deepcopy(model)
        if source is not None:
            lorakit.load_adapter(copied, source)
        with torch.no_grad():
            logits.append(copied(input_ids=ids).logits)
    assert torch.equal(logits[0], logits[1])
    assert not torch.allclose(logits[0], logits[2])  # the adapter is really there


def test_inspect_prints_the_digest(good):
    shown = subprocess.run([sys.executable, "-m", "lorakit.cli", "inspect", str(good), "--json"],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["digest"] == Adapter.read(good).digest
