"""`lorakit serve`'s adapter policy: --registry references, --require-signed with --trusted-key, and
--require-vetted, at start-up and at runtime load, with real EC keys, a real registry, real `lorakit serve`
subprocesses and the official `openai` client."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.registry import Registry
from lorakit.signing import sign_adapter
from test_serve import save_random_adapter, start_server
from test_signing import _key_pair, _flip_last_byte
from tiny_models import llama


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Keys, an adapter root of signed and refused adapters, and a registry holding a vetted and an
    unvetted signed version."""
    tmp = tmp_path_factory.mktemp("policy")
    (signer, signer_pub), (other, _) = _key_pair(tmp, "signer"), _key_pair(tmp, "other")
    root = tmp / "root"
    other_base = tmp / "other_base"
    llama(seed=1)[0].save_pretrained(other_base)

    def adapter(name: str, seed: int, key=signer, base="embedded", vet=None) -> Path:
        folder = save_random_adapter(root / name, seed)
        if vet is not None:  # before signing, so the signature covers the report
            (folder / "vet_report.json").write_text(json.dumps({"verdict": vet}))
        if key is not None:
            sign_adapter(folder, key, base_model=base)
        return folder

    folders = {"signed": adapter("signed", 0), "unsigned": adapter("unsigned", 1, key=None),
               "other-key": adapter("other-key", 2, key=other), "tampered": adapter("tampered", 3),
               "wrong-base": adapter("wrong-base", 4, base=other_base),
               "vetted": adapter("vetted", 5, vet="pass"), "plain": adapter("plain", 6)}
    _flip_last_byte(folders["tampered"] / "adapter_model.safetensors")
    registry = Registry.open(tmp / "registry")
    entries = {name: registry.add(folders[name], name=name).entry for name in ("vetted", "plain")}
    return {"key": signer_pub, "root": root, "folders": folders, "registry": tmp / "registry",
            "entries": entries, "tmp": tmp}


def _refused_at_start(world, *flags: str) -> str:
    done = subprocess.run([sys.executable, "-m", "lorakit.cli", "serve", "--port", "0", *flags],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("name, reason", [("unsigned", "not signed"), ("other-key", "another key"),
                                          ("tampered", "adapter_model.safetensors"), ("wrong-base", "signed for base")])
def test_an_adapter_the_keys_do_not_vouch_for_is_refused_at_start_up(world, name, reason):
    line = _refused_at_start(world, "--require-signed", "--trusted-key", str(world["key"]),
                             "--adapter", f"a={world['folders'][name]}")
    assert "--require-signed" in line and reason in line


def test_flag_errors_and_require_vetted_refusing_unvetted_and_plain_folders_are_one_line(world):
    assert "--trusted-key" in _refused_at_start(world, "--require-signed")
    assert "not a registry" in _refused_at_start(world, "--registry", str(world["root"]))  # never turned into one
    line = _refused_at_start(world, "--registry", str(world["registry"]), "--require-vetted", "--adapter", "p=plain")
    assert "--require-vetted" in line and "'unvetted'" in line
    line = _refused_at_start(world, "--registry", str(world["registry"]), "--require-vetted",
                             "--adapter", f"s={world['folders']['signed']}")
    assert "--require-vetted" in line and "outside the registry" in line


def test_signed_adapters_and_registry_references_are_served_and_the_rest_refused_at_runtime(world):
    pinned = world["entries"]["vetted"].reference
    server = start_server(world["tmp"], "--require-signed", "--trusted-key", str(world["key"]),
                          "--registry", str(world["registry"]), "--adapter", f"good={world['folders']['signed']}",
                          "--adapter", f"reg={pinned}", "--allow-runtime-loading",
                          "--adapter-root", str(world["root"]))
    try:
        for name in ("unsigned", "other-key", "tampered", "wrong-base"):
            answer = server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": name})
            message = answer.json()["error"]["message"]
            assert answer.status_code == 403 and answer.json()["error"]["code"] == "adapter_refused", message
            assert "--require-signed" in message and str(world["root"]) not in message
        assert server.post("/v1/load_lora_adapter", {"lora_name": "late", "lora_path": "registry:plain"}).is_success
        missing = server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "registry:nope"})
        assert missing.status_code == 404 and str(world["registry"]) not in missing.json()["error"]["message"]

        client = server.client()
        models = {m.id: m for m in client.models.list().data}  # the official client parses the extra field
        assert set(models) >= {"good", "reg", "late"} and "unsigned" not in models
        good, reg, late = (models[n].model_extra["lorakit"] for n in ("good", "reg", "late"))
        assert good["signed_by"] == world["key"].name and good["registry"] is None and good["vetted"] is None
        assert good["digest"].startswith("sha256:")
        assert {k: v for k, v in reg.items() if k != "card"} == {
            "digest": world["entries"]["vetted"].digest, "registry": pinned, "signed_by": world["key"].name,
            "vetted": "pass"}
        for trust in (good, reg):  # the signed card, as lorakit sign wrote it, without server paths
            assert trust["card"]["adapter"]["digest"] == trust["digest"] and trust["card"]["base"]["name"]
            assert str(world["root"]) not in json.dumps(trust["card"])
        assert late["registry"] == world["entries"]["plain"].reference and late["vetted"] == "unvetted"
        for model in ("good", "reg", "late"):
            assert client.completions.create(model=model, prompt="Hello", max_tokens=3).choices[0].text is not None
    finally:
        server.stop()


def test_require_vetted_serves_a_passing_registry_version_and_refuses_an_unvetted_load(world):
    server = start_server(world["tmp"], "--registry", str(world["registry"]), "--require-vetted",
                          "--adapter", "v=vetted", "--allow-runtime-loading")
    try:
        refused = server.post("/v1/load_lora_adapter", {"lora_name": "p", "lora_path": "registry:plain"})
        assert refused.status_code == 403 and "--require-vetted" in refused.json()["error"]["message"]
        listed = {m.id: m.model_extra["lorakit"] for m in server.client().models.list().data if m.id == "v"}
        assert listed["v"]["vetted"] == "pass" and listed["v"]["signed_by"] is None
    finally:
        server.stop()
