"""Portable, shareable adapters: the base an adapter records survives a move, merging it twice is refused,
the model card's instructions work as written, and `lorakit push` sends exactly the adapter's files.

Real files, real subprocesses of the `lorakit` command, a tiny Llama saved as a base folder; the hub is
stood in for by a local HTTP server (see `FakeHub`)."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import peft
import pytest
import torch
from huggingface_hub import metadata_load

import lorakit
from lorakit import Adapter
from lorakit.errors import AdapterError
from lorakit.io.base_record import METADATA_KEY, check_base, compare_base
from lorakit.io.model_card import write_model_card
from lorakit.io.push import PushError, push_adapter
from lorakit.models import EMBEDDED_MODEL, load_model
from tiny_models import llama, save_tiny_llama_folder

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
TRAIN_CONFIG = {"model": None, "data": "rows/train.jsonl", "eval_data": "rows/heldout.jsonl", "lr": 0.003,
                "max_steps": 40, "num_epochs": None, "batch_size": 4, "gradient_accumulation_steps": 1,
                "max_length": 64, "precision": "auto", "seed": 0}
REPORT = {"steps": 40, "precision": "fp32",
          "data": {"train": {"examples": 120, "truncated": 0, "dropped": 0, "tokens": 2345, "label_tokens": 678},
                   "heldout": "rows/heldout.jsonl"},
          "eval_before": {"loss": 5.1234, "exact_match": 0.0, "exact_match_samples": 12},
          "eval_after": {"loss": 0.4321, "exact_match": 0.75, "exact_match_samples": 12}}


def lorakit_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def save_base(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama and its tokenizer as a Hugging Face model folder."""
    return save_tiny_llama_folder(folder, seed=seed, max_positions=128)


def save_adapter_on(base: Path, folder: Path) -> Path:
    """A rank-4 adapter with nonzero B (so merging it changes the weights), saved from the base at `base`."""
    model = load_model(str(base))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    return lorakit.save_adapter(model, folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_base(tmp_path_factory.mktemp("models") / "base")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    return save_adapter_on(base, tmp_path_factory.mktemp("adapters") / "reverse")


def attached(model_path, adapter_folder):
    """(model from `model_path` with the adapter loaded, the adapter's name, the Adapter)."""
    value = Adapter.read(adapter_folder)
    model = model_path if isinstance(model_path, torch.nn.Module) else load_model(str(model_path))
    return model, lorakit.load_adapter(model, value), value


# --- A: the recorded base -----------------------------------------------------------------------------
def test_the_adapter_records_its_base_by_path_and_weights_where_peft_does_not_look(base, adapter):
    record = Adapter.read(adapter).base
    assert record.name == str(base) and record.source == "local"
    assert record.digest.startswith("sha256:") and len(record.digest) == 71
    assert sorted(record.probe) == sorted(f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj"))
    config = json.loads((adapter / CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(base) and METADATA_KEY not in json.dumps(config)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Unexpected keyword arguments")  # what PEFT says of unknown keys
        peft_model = peft.PeftModel.from_pretrained(load_model(str(base)), str(adapter))
    model, _, _ = attached(base, adapter)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, model(input_ids=ids).logits)

    copy = Adapter.read(adapter).save(adapter.parent / "copy")
    assert Adapter.read(copy).digest == Adapter.read(adapter).digest and Adapter.read(copy).base == record


def test_a_hub_base_is_recorded_by_its_id_and_the_embedded_one_by_its_name(tmp_path):
    model, _ = llama()
    model.config._name_or_path = "someone/tiny-llama"
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    record = Adapter.read(lorakit.save_adapter(model, tmp_path / "hub")).base
    assert (record.name, record.source) == ("someone/tiny-llama", "hub")

    embedded = load_model(None)
    lorakit.add_adapter(embedded, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    folder = lorakit.save_adapter(embedded, tmp_path / "embedded")
    record = Adapter.read(folder).base
    assert (record.name, record.source) == ("lorakit-embedded", "embedded") and record.digest
    assert json.loads((folder / CONFIG).read_text())["base_model_name_or_path"] == "lorakit-embedded"
    for name in (CONFIG, WEIGHTS):  # this machine's install path appears nowhere
        assert str(EMBEDDED_MODEL).encode() not in (folder / name).read_bytes()


# --- B: merging twice ---------------------------------------------------------------------------------
def test_merging_an_adapter_into_a_model_that_already_holds_it_is_refused_and_force_goes_through(base, adapter,
                                                                                               tmp_path):
    once = tmp_path / "merged-once"
    result = lorakit_cli("merge", "--model", base, "--adapter", adapter, "--output", once)
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr

    twice = tmp_path / "merged-twice"
    result = lorakit_cli("merge", "--model", once, "--adapter", adapter, "--output", twice)
    assert result.returncode == 2 and not twice.exists()
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"lorakit merge: error: this model already contains the adapter {adapter} "
                                    "(merged); merging again would apply it twice")

    result = lorakit_cli("merge", "--model", once, "--adapter", adapter, "--output", twice, "--force")
    assert result.returncode == 0 and (twice / "config.json").is_file()
    assert "already contains" in result.stderr and "applying it a second time" in result.stderr


def test_generate_finds_the_recorded_base_refuses_a_merged_one_and_asks_for_a_moved_one(base, adapter, tmp_path):
    """No --model: the base the adapter records. A model holding it merged: refused, not applied twice."""
    alone = lorakit_cli("generate", "--adapter", adapter, "--max-new-tokens", 2, "hello")
    given = lorakit_cli("generate", "--model", base, "--adapter", adapter, "--max-new-tokens", 2, "hello")
    assert alone.returncode == 0 and given.returncode == 0, alone.stderr + given.stderr
    assert alone.stdout == given.stdout and "warning" not in alone.stderr

    merged = tmp_path / "merged"
    assert lorakit_cli("merge", "--model", base, "--adapter", adapter, "--output", merged).returncode == 0
    refused = lorakit_cli("generate", "--model", merged, "--adapter", adapter, "hello")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "already contains the adapter" in refused.stderr and "without --adapter" in refused.stderr

    gone = tmp_path / "base-elsewhere"
    shutil.copytree(base, gone)
    orphan = tmp_path / "orphan"
    save_adapter_on(gone, orphan)
    shutil.rmtree(gone)
    result = lorakit_cli("generate", "--adapter", orphan, "hello")
    assert result.returncode == 2 and f"trained on the model folder {gone}, which is not there" in result.stderr
    assert "pass --model" in result.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_merged_model_is_told_apart_from_its_base_at_any_precision(base, adapter, dtype):
    model, name, value = attached(base, adapter)
    assert compare_base(model, name, value.base).status == "same"
    merged = lorakit.merge_and_unload(model).to(dtype).float()  # saved in `dtype`, loaded back as fp32
    lorakit.load_adapter(merged, value)
    assert compare_base(merged, name, value.base).status == "merged"
    with pytest.raises(AdapterError, match="already contains the adapter .* merging again would apply it twice"):
        check_base(merged, name, value.base, str(adapter))
    assert check_base(merged, name, value.base, str(adapter), force=True).status == "merged"

    rounded, _, _ = attached(load_model(str(base), dtype=dtype).float(), adapter)
    assert compare_base(rounded, name, value.base).status == ("same" if dtype == torch.float32 else "rounded")


def test_another_base_gets_a_one_line_warning_naming_the_recorded_one(base, adapter, tmp_path):
    other, name, value = attached(save_base(tmp_path / "other", seed=1), adapter)
    match = check_base(other, name, value.base, str(adapter))
    assert match.status == "different" and str(base) in match.warning and "\n" not in match.warning

    another = load_model(str(base))  # the base with some other adapter merged in is not "already merged"
    lorakit.add_adapter(another, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    another, name, value = attached(lorakit.merge_and_unload(another), adapter)
    assert compare_base(another, name, value.base).status == "different"

    peft_made = tmp_path / "peft-made"  # PEFT records no base: nothing to compare, nothing said
    peft.PeftModel.from_pretrained(load_model(str(base)), str(adapter)).save_pretrained(peft_made)
    assert Adapter.read(peft_made).base is None
    model, name, value = attached(base, peft_made)
    assert compare_base(model, name, value.base).status == "unknown" and check_base(model, name, None, "x").warning is None


# --- C: the model card --------------------------------------------------------------------------------
def test_the_model_card_says_what_the_run_did_in_front_matter_the_hub_reads(adapter, tmp_path):
    adapter = Path(shutil.copytree(adapter, tmp_path / "reverse"))
    card = write_model_card(adapter, train_config=TRAIN_CONFIG, report=REPORT)
    text = card.read_text()
    assert metadata_load(card) == {"library_name": "peft", "tags": ["lora", "lorakit"]}  # no hub id to link
    record = Adapter.read(adapter).base
    for expected in (record.name, record.digest, "rows/train.jsonl", "rows/heldout.jsonl",
                     "120 training examples, 2,345 tokens", "| rank r | 4 |", "| lora_alpha | 4 |",
                     "| target modules | q_proj, v_proj |", "| learning rate | 0.003 |", "| optimizer steps | 40 |",
                     "| batch size | 4 |", "| precision | fp32 |", "| base model (before) | 0.0% of 12 | 5.1234 |",
                     "| with this adapter (after) | 75.0% of 12 | 0.4321 |",
                     "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER)",
                     f"vllm serve {record.name} --enable-lora --lora-modules reverse={adapter} --max-lora-rank 8",
                     f"lorakit generate --model {record.name} --adapter {adapter} \"...\"",
                     f"lorakit serve --model {record.name} --adapter reverse={adapter}"):
        assert expected in text, expected


def test_a_hub_base_is_linked_in_the_front_matter(tmp_path):
    model, _ = llama()
    model.config._name_or_path = "someone/tiny-llama"
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    card = write_model_card(lorakit.save_adapter(model, tmp_path / "a"), adapter_id="someone/tiny-llama-reverse")
    assert metadata_load(card)["base_model"] == "someone/tiny-llama"
    assert "ADAPTER = \"someone/tiny-llama-reverse\"" in card.read_text()


def test_the_cards_instructions_work_after_moving_the_base_and_the_adapter(tmp_path):
    old_base, old_adapter = save_base(tmp_path / "old" / "base"), tmp_path / "old" / "adapter"
    save_adapter_on(old_base, old_adapter)
    card = write_model_card(old_adapter, train_config=TRAIN_CONFIG, report=REPORT).read_text()
    new_base, new_adapter = tmp_path / "moved" / "my base", tmp_path / "moved" / "my adapter"
    new_base.parent.mkdir()
    shutil.move(old_base, new_base)
    shutil.move(old_adapter, new_adapter)

    def follow(text: str, quote=str) -> str:  # what the reader does: put in the new paths
        return text.replace(quote(old_base), quote(new_base)).replace(quote(old_adapter), quote(new_adapter))

    code = follow(re.search(r"With PEFT:\n\n```python\n(.*?)```", card, re.S).group(1))
    scope: dict = {}
    exec(code, scope)
    model, name, value = attached(new_base, new_adapter)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        torch.testing.assert_close(scope["model"](input_ids=ids).logits, model(input_ids=ids).logits)
    assert compare_base(model, name, value.base).status == "same"  # the moved base is still the recorded one

    command = follow(re.search(r"^lorakit generate .*$", card, re.M).group(0), lambda p: shlex.quote(str(p)))
    command = command.replace('"..."', '"hello"')
    result = lorakit_cli(*shlex.split(command)[1:], "--max-new-tokens", 4)
    assert result.returncode == 0, result.stderr


# --- D: push ------------------------------------------------------------------------------------------
class FakeHub:
    """The hub's upload API on 127.0.0.1, because this machine has no internet: what huggingface_hub 2.x
    sends for `create_repo`, `create_branch` and `upload_folder` (hf_api.py, _commit_api.py,
    _upload_pipeline.py): POST /api/repos/create; POST /api/models/{repo}/branch/{branch};
    POST /api/validate-yaml (README.md's front matter); POST /api/models/{repo}/preupload/{rev}, answered
    "regular" for every file so contents travel inline rather than through Xet/LFS storage; and
    POST /api/models/{repo}/commit/{rev}, an ndjson body with each file base64-encoded.
    A repository whose owner is "forbidden" is refused (403), as the hub refuses a namespace not yours."""

    def __init__(self):
        self.requests: list[tuple[str, dict, bytes]] = []
        self.files: dict[str, bytes] = {}
        self.commits: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append((self.path, dict(self.headers), body))
                status, answer = hub.answer(self.path.split("?")[0], body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                if status >= 400:
                    self.send_header("X-Error-Message", answer["error"])
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_POST

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, body: bytes) -> tuple[int, dict]:
        if path == "/api/repos/create":
            request = json.loads(body)
            if request["organization"] == "forbidden":
                return 403, {"error": "You don't have the rights to create a model under the namespace forbidden"}
            return 200, {"url": f"{self.url}/{request['organization']}/{request['name']}"}
        if path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/branch/[^/]+", path):
            return 200, {}
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/preupload/[^/]+", path):
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                   for f in files]}
        commit = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path)
        if commit:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            self.commits.append({"repo": commit.group(1), "revision": commit.group(2), "header": lines[0]["value"]})
            for line in lines[1:]:
                assert line["key"] == "file" and line["value"]["encoding"] == "base64", line
                self.files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            return 200, {"commitUrl": f"{self.url}/{commit.group(1)}/commit/{'a' * 40}", "commitOid": "a" * 40}
        return 404, {"error": f"the fake hub does not serve {path}"}

    def paths(self) -> list[str]:
        return [path.split("?")[0] for path, _, _ in self.requests]

    def uploads(self) -> list[tuple[str, dict, bytes]]:
        """The requests of the upload API, in order (huggingface_hub also asks, once a day, for the list of
        agent harnesses it recognises; that one gets a 404 here)."""
        return [r for r in self.requests if r[0].startswith(("/api/repos/", "/api/models/", "/api/validate-yaml"))]


@pytest.fixture
def hub():
    fake = FakeHub()
    yield fake
    fake.server.shutdown()


@pytest.fixture
def run_folder(adapter, tmp_path) -> Path:
    """A `lorakit train` output: the adapter, its settings and report, and what must stay at home."""
    folder = tmp_path / "run"
    shutil.copytree(adapter, folder)
    (folder / "train_config.json").write_text(json.dumps(TRAIN_CONFIG))
    (folder / "train_report.json").write_text(json.dumps(REPORT))
    for private in ("checkpoints/step-40/adapter/adapter_model.safetensors", "data/train.jsonl", "metrics.jsonl",
                    "curves.png"):
        (folder / private).parent.mkdir(parents=True, exist_ok=True)
        (folder / private).write_bytes(b"not for the hub")
    return folder


def test_push_uploads_exactly_the_adapter_files_byte_for_byte(hub, run_folder):
    url = push_adapter(run_folder, "alice/reverse", private=True, token="hf_secret", endpoint=hub.url)
    assert url == f"{hub.url}/alice/reverse"
    sent = {"adapter_config.json", "adapter_model.safetensors", "README.md", "train_config.json", "train_report.json"}
    assert set(hub.files) == sent
    for name in sent:
        assert hub.files[name] == (run_folder / name).read_bytes(), name
    assert "ADAPTER = \"alice/reverse\"" in hub.files["README.md"].decode()  # the card, written for the hub id
    path, _, body = hub.uploads()[0]
    assert path == "/api/repos/create" and json.loads(body)["visibility"] == "private"
    assert all(headers["authorization"] == "Bearer hf_secret" for _, headers, _ in hub.uploads())
    assert hub.commits[0]["repo"] == "alice/reverse" and hub.commits[0]["revision"] == "main"


def test_lorakit_push_takes_the_token_from_the_environment_and_uploads_to_a_branch(hub, run_folder, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_from_env", "HF_HOME": str(tmp_path / "hf-home")}
    result = lorakit_cli("push", run_folder, "alice/reverse", "--revision", "v2", "--commit-message", "first cut",
                         env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"pushed {run_folder} -> {hub.url}/alice/reverse (branch v2)"
    assert "/api/models/alice/reverse/branch/v2" in hub.paths()
    assert hub.commits == [{"repo": "alice/reverse", "revision": "v2", "header": {"summary": "first cut",
                                                                                    "description": ""}}]
    assert hub.uploads()[0][1]["authorization"] == "Bearer hf_from_env" and "README.md" in hub.files


def test_push_says_in_one_line_what_stopped_it(hub, run_folder, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    result = lorakit_cli("push", run_folder, "alice/reverse", env={**env, "HF_ENDPOINT": hub.url,
                                                                   "HF_HOME": str(tmp_path / "no-login")})
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("lorakit push: error: no Hugging Face token: pass --token, set HF_TOKEN")

    broken = tmp_path / "broken"
    shutil.copytree(run_folder, broken)
    weights = broken / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(lorakit.errors.AdapterFileError, match="truncated|corrupt"):
        push_adapter(broken, "alice/reverse", token="hf_secret", endpoint=hub.url)
    assert hub.uploads() == []  # refused before anything was sent

    with pytest.raises(PushError, match="refused forbidden/reverse: .*403") as refused:
        push_adapter(run_folder, "forbidden/reverse", token="hf_secret", endpoint=hub.url)
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()
    with pytest.raises(PushError, match=f"could not reach the Hugging Face hub at http://127.0.0.1:{port}") as away:
        push_adapter(run_folder, "alice/reverse", token="hf_secret", endpoint=f"http://127.0.0.1:{port}")
    for error in (refused.value, away.value):
        assert "\n" not in str(error)
    with pytest.raises(PushError, match="not a hub repository id"):
        push_adapter(run_folder, "just-a-name", token="hf_secret", endpoint=hub.url)


def test_serve_without_a_model_serves_the_base_its_adapters_record(base, adapter, tmp_path):
    """A real `lorakit serve` on loopback with the official client: no --model, the adapter's own base."""
    from test_serve import start_server

    other = save_adapter_on(save_base(tmp_path / "another-base", seed=1), tmp_path / "other")
    mixed = lorakit_cli("serve", "--port", "0", "--adapter", f"a={adapter}", "--adapter", f"b={other}")
    assert mixed.returncode == 2 and mixed.stderr.count("\n") == 1
    assert "trained on different base models" in mixed.stderr and "pass --model" in mixed.stderr

    server = start_server(tmp_path, "--adapter", f"tiny={adapter}")
    try:
        client = server.client()
        assert [m.id for m in client.models.list().data] == [base.name, "tiny"]
        reply = client.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens >= 1
    finally:
        server.stop()
    assert f"base model {base} (the one the adapters record" in server.stderr.read_text()
