"""The adapter registry: versions addressed by content digest under names, stored atomically, safe under
concurrent writers, re-hashed before use. Real adapter folders (the embedded model), real SQLite files,
the `lorakit registry` command and concurrent writers as real subprocesses."""

from __future__ import annotations

import copy
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch

import lorakit
from lorakit import Adapter
from lorakit.models import load_model
from lorakit.registry import Registry, RegistryError
from lorakit.registry.location import registry_path

FAKE_A, FAKE_B = "sha256:" + "ab" * 4 + "1" * 56, "sha256:" + "ab" * 4 + "2" * 56  # share 8 hex digits


@pytest.fixture(scope="module")
def model():
    return load_model(None)


@pytest.fixture(scope="module")
def make_adapter(model, tmp_path_factory):
    """make_adapter(seed, folder name) -> a rank-2 adapter folder; another seed gives another digest."""
    root = tmp_path_factory.mktemp("adapters")

    def make(seed: int, name: str = "reverse") -> Path:
        folder = root / f"{seed}" / name
        if not folder.exists():
            m = copy.deepcopy(model)
            torch.manual_seed(seed)
            lorakit.add_adapter(m, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
            lorakit.save_adapter(m, folder)
        return folder
    return make


def _lorakit(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit.cli", *args], capture_output=True, text=True, timeout=120,
                          **kwargs)


def _writable(path: Path) -> Path:
    path.chmod(0o644)  # stored files are read-only; the tests damage them on purpose
    return path


def test_add_resolves_latest_and_pins_a_version(make_adapter, tmp_path):
    registry = Registry.open(tmp_path / "reg")
    first = registry.add(make_adapter(1)).entry
    second = registry.add(make_adapter(2), name="reverse").entry
    assert first.name == second.name == "reverse" and first.digest != second.digest
    assert first.digest == Adapter.read(make_adapter(1)).digest
    assert registry.resolve("reverse") == second
    assert registry.resolve(f"reverse@{first.digest[7:15]}") == first
    assert registry.resolve(f"reverse@{first.digest}") == first                       # the full "sha256:..." too
    assert Adapter.read(registry.get(f"reverse@{first.digest[7:15]}")).digest == first.digest
    assert [e.digest for e in registry.entries("reverse")] == [first.digest, second.digest]
    assert first.base == "lorakit-embedded" and not first.signed and first.vetted == "unvetted"
    assert (tmp_path / "reg" / "index.sqlite").is_file()
    assert sqlite3.connect(tmp_path / "reg" / "index.sqlite").execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_version_is_stored_once_and_another_name_is_an_alias(make_adapter, tmp_path):
    registry = Registry.open(tmp_path)
    added = registry.add(make_adapter(1))
    again = registry.add(make_adapter(1))
    alias = registry.add(make_adapter(1), name="reverse-prod")
    assert (added.outcome, again.outcome, alias.outcome) == ("added", "unchanged", "alias")
    assert again.entry == added.entry and alias.entry.digest == added.entry.digest
    assert len(list((tmp_path / "versions").iterdir())) == 1
    assert [e.name for e in registry.entries()] == ["reverse", "reverse-prod"]


def test_card_signature_run_files_and_vet_report_travel_with_the_version(make_adapter, tmp_path):
    folder = tmp_path / "signed"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((make_adapter(3) / name).read_bytes())
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# reverse, signed\n")
    (folder / "model.sig").write_text("signature")
    (folder / "vet_report.json").write_text(json.dumps({"verdict": "pass"}))
    (folder / "train_config.json").write_text("{}")
    (folder / "notes.txt").write_text("not an adapter file")
    registry = Registry.open(tmp_path / "reg")
    entry = registry.add(folder).entry
    assert entry.name == "signed" and entry.signed and entry.vetted == "pass"
    assert set(entry.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md", "model.sig",
                                "vet_report.json", "train_config.json"}
    assert (registry.get("signed") / "model.sig").read_text() == "signature"
    (folder / "vet_report.json").write_text("[]")
    with pytest.raises(RegistryError, match="verdict"):
        registry.add(folder, name="other")


def test_a_pickle_file_anywhere_in_the_folder_is_refused(make_adapter, tmp_path):
    folder = tmp_path / "reverse"
    (folder / "checkpoint").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((make_adapter(1) / name).read_bytes())
    (folder / "checkpoint" / "optimizer.pt").write_bytes(b"\x80\x04")
    registry = Registry.open(tmp_path / "reg")
    with pytest.raises(RegistryError, match=r"pickle files \(checkpoint/optimizer.pt\)"):
        registry.add(folder)
    assert registry.entries() == [] and list((tmp_path / "reg" / "versions").iterdir()) == []


def test_a_damaged_version_is_named_by_file_and_never_served(make_adapter, tmp_path):
    registry = Registry.open(tmp_path)
    changed = registry.add(make_adapter(1), name="changed").entry
    missing = registry.add(make_adapter(2), name="missing").entry
    extra = registry.add(make_adapter(3), name="extra").entry
    intact = registry.add(make_adapter(4), name="intact").entry
    weights = _writable(registry.storage.folder(changed.digest) / "adapter_model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (registry.storage.folder(missing.digest) / "adapter_config.json").unlink()
    (registry.storage.folder(extra.digest) / "payload.py").write_text("import os")
    with pytest.raises(RegistryError, match=r"changed@\w+ is damaged .*adapter_model.safetensors changed"):
        registry.get("changed")
    with pytest.raises(RegistryError, match="adapter_config.json is missing"):
        registry.get("missing")
    with pytest.raises(RegistryError, match="payload.py was added"):
        registry.export("extra", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert registry.get("intact") == registry.storage.folder(intact.digest)
    assert sorted(d.names[0] for d in registry.check()) == ["changed", "extra", "missing"]
    result = _lorakit("registry", "check", "--registry", str(tmp_path))
    assert result.returncode == 1, result.stderr
    assert "adapter_model.safetensors changed" in result.stdout and "3 damaged" in result.stdout


def test_adding_again_restores_a_damaged_version_and_replaces_an_interrupted_add(make_adapter, tmp_path):
    registry = Registry.open(tmp_path)
    entry = registry.add(make_adapter(1)).entry
    (registry.storage.folder(entry.digest) / "adapter_config.json").unlink()
    assert registry.add(make_adapter(1)).outcome == "unchanged" and registry.check() == []
    registry.remove("reverse")                      # as if an add died after storing its files, before indexing
    registry.storage.put_files(entry.digest, {"adapter_config.json": make_adapter(1) / "adapter_config.json"})
    assert [d.problems[0].startswith("not in the index") for d in registry.check()] == [True]
    assert registry.add(make_adapter(1)).outcome == "added" and registry.check() == []


def test_remove_keeps_files_another_name_uses_and_all_removes_every_version(make_adapter, tmp_path):
    registry = Registry.open(tmp_path)
    first = registry.add(make_adapter(1)).entry
    registry.add(make_adapter(1), name="alias")
    registry.add(make_adapter(2))
    registry.remove(f"reverse@{first.short_digest}")
    assert registry.get("alias").is_dir()                        # still named: the files stay
    registry.remove("alias")
    assert not registry.storage.folder(first.digest).exists()   # no name left: the files go
    with pytest.raises(RegistryError, match="give the name alone"):
        registry.remove("reverse@12345678", all_versions=True)
    registry.add(make_adapter(3), name="reverse")
    assert len(registry.remove("reverse", all_versions=True)) == 2
    assert registry.entries() == [] and list((tmp_path / "versions").iterdir()) == []


def test_export_is_a_plain_adapter_folder_lorakit_and_peft_load(make_adapter, model, tmp_path):
    registry = Registry.open(tmp_path / "reg")
    registry.add(make_adapter(1))
    out = registry.export("reverse", tmp_path / "out")
    assert Adapter.read(out).digest == registry.resolve("reverse").digest
    assert os.access(out / "adapter_model.safetensors", os.W_OK)   # the user's copy, not the store's
    lorakit.load_adapter(copy.deepcopy(model), out)
    peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out))
    with pytest.raises(RegistryError, match="not an empty folder"):
        registry.export("reverse", out)


def test_unknown_and_ambiguous_references_are_one_line_with_the_candidates(make_adapter, tmp_path):
    registry = Registry.open(tmp_path)
    entry = registry.add(make_adapter(1)).entry
    with registry.storage.writing():  # two versions whose digests share 8 hex digits
        for digest in (FAKE_A, FAKE_B):
            registry.storage.record_version(digest, {}, False, "unvetted", None)
            registry.storage.record_name("twins", digest, "2026-01-01T00:00:00+00:00")
    cases = {"nothing": "no adapter named 'nothing' .* \\(its names: reverse, twins\\)",
             "reverse@00000000": f"no version of 'reverse' starts with 00000000; its versions: {entry.reference}",
             "twins@abababab": "'twins@abababab' matches 2 versions .*; give more of the digest",
             "reverse@abc": "at least 8 hex digits", "bad name": "cannot name an adapter"}
    for reference, message in cases.items():
        with pytest.raises(RegistryError, match=message) as caught:
            registry.resolve(reference)
        assert "\n" not in str(caught.value)
    assert registry.resolve("twins@abababab1").digest == FAKE_A


def test_the_command_adds_lists_and_shows(make_adapter, tmp_path):
    reg = str(tmp_path / "reg")
    added = _lorakit("registry", "add", str(make_adapter(1)), "--registry", reg)
    assert added.returncode == 0 and ": added" in added.stdout, added.stderr
    listed = json.loads(_lorakit("registry", "list", "--json", "--registry", reg).stdout)
    assert [(e["name"], e["vetted"], e["signed"]) for e in listed] == [("reverse", "unvetted", False)]
    shown = _lorakit("registry", "show", f"reverse@{listed[0]['digest'][7:17]}", "--registry", reg)
    assert "signature: unsigned" in shown.stdout and "adapter_model.safetensors" in shown.stdout


def test_the_command_exports_removes_and_refuses_in_one_line(make_adapter, tmp_path):
    reg = tmp_path / "reg"
    Registry.open(reg).add(make_adapter(1))
    exported = _lorakit("registry", "export", "reverse", str(tmp_path / "out"), "--registry", str(reg))
    assert exported.returncode == 0 and Adapter.read(tmp_path / "out").digest == Registry.open(reg).resolve(
        "reverse").digest, exported.stderr
    removed = _lorakit("registry", "remove", "reverse", "--registry", str(reg))
    assert removed.stdout.startswith("removed reverse@")
    unknown = _lorakit("registry", "show", "reverse", "--registry", str(reg))
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert unknown.stderr.startswith("lorakit registry: error: no adapter named 'reverse'")
    assert "is empty" in unknown.stderr


def test_concurrent_writers_all_succeed_and_the_index_stays_consistent(make_adapter, tmp_path):
    reg = str(tmp_path / "reg")
    jobs = [(make_adapter(1), "a"), (make_adapter(2), "b"), (make_adapter(1), "c"), (make_adapter(3), "d")]
    writers = [subprocess.Popen([sys.executable, "-m", "lorakit.cli", "registry", "add", str(folder), "--name", name,
                                 "--registry", reg], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for folder, name in jobs]
    results = [(w.wait(timeout=120), w.stderr.read()) for w in writers]
    assert [code for code, _ in results] == [0, 0, 0, 0], results
    registry = Registry.open(reg)
    assert sorted(e.name for e in registry.entries()) == ["a", "b", "c", "d"]
    assert registry.resolve("a").digest == registry.resolve("c").digest
    assert len(list((tmp_path / "reg" / "versions").iterdir())) == 3 and registry.check() == []


def test_the_default_registry_is_the_users_data_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAKIT_REGISTRY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert registry_path() == tmp_path / "data" / "lorakit" / "registry"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert registry_path() == Path.home() / ".local" / "share" / "lorakit" / "registry"
    monkeypatch.setenv("LORAKIT_REGISTRY", str(tmp_path / "mine"))
    assert registry_path() == tmp_path / "mine" and registry_path(tmp_path / "given") == tmp_path / "given"
