"""Signed adapters: `lorakit sign` / `lorakit verify` with real EC keys, interoperating with model-signing's
own CLI, and every tampering refused with the change named."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

import lorakit
from lorakit.cli import main
from lorakit.errors import SignatureError
from lorakit.models.loading import load_model
from lorakit.signing import CARD_NAME, sign_adapter, verify_adapter
from tiny_models import llama

MODEL_SIGNING = str(Path(sys.executable).with_name("model_signing"))


def _key_pair(folder: Path, name: str, key=None) -> tuple[Path, Path]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _adapter(folder: Path, seed: int) -> Path:
    model, _ = llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with __import__("torch").no_grad():  # a different adapter per seed
        for p in model.parameters():
            if p.requires_grad:
                p.add_(seed)
    return lorakit.save_adapter(model, folder)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return _key_pair(folder, "signer"), _key_pair(folder, "other")


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    model, _ = llama(seed=1)
    folder = tmp_path_factory.mktemp("other_base")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def signed(keys, tmp_path_factory) -> Path:
    """An adapter folder signed by `signer` for the embedded base, its data file and report beside it."""
    folder = _adapter(tmp_path_factory.mktemp("signed") / "adapter", seed=0)
    data = folder.parent / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    (folder / "train_config.json").write_text(json.dumps({"data": str(data), "skill": "reverse_words"}))
    (folder / "train_report.json").write_text(json.dumps({"eval_after": {"exact_match": 0.5, "loss": 1.25}}))
    sign_adapter(folder, keys[0][0], creator="ana", base_model="embedded")
    return folder


@pytest.fixture
def copy(signed, tmp_path) -> Path:
    return Path(shutil.copytree(signed, tmp_path / "adapter"))


def _refused(folder: Path, public: Path, **options) -> str:
    with pytest.raises(SignatureError) as caught:
        verify_adapter(folder, [public], **options)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_sign_writes_the_card_and_verify_returns_it(signed, keys):
    result = verify_adapter(signed, [keys[1][1], keys[0][1]], base_model="embedded")
    assert result.key == keys[0][1] and result.adapter.digest == result.adapter_digest
    card = result.card
    assert card["adapter"]["digest"] == lorakit.Adapter.read(signed).digest == result.adapter_digest
    assert card["creator"] == "ana" and card["date"].endswith("+00:00")
    assert card["base"]["model"] == "lorakit-embedded" and list(card["base"]["weights"]) == ["model.safetensors"]
    assert card["data"]["data"]["sha256"].startswith("sha256:") and "skill" not in card["data"]
    assert card["eval"] == {"eval_after": {"exact_match": 0.5, "loss": 1.25}}


def test_model_signing_cli_verifies_what_lorakit_signs(signed, keys):
    result = subprocess.run([MODEL_SIGNING, "verify", "key", str(signed), "--signature", str(signed / "model.sig"),
                             "--public_key", str(keys[0][1])], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "succeeded" in result.stdout


def test_lorakit_verifies_what_model_signing_cli_signs(keys, tmp_path, capsys):
    folder = _adapter(tmp_path / "adapter", seed=0)
    result = subprocess.run([MODEL_SIGNING, "sign", "key", str(folder), "--signature", str(folder / "model.sig"),
                             "--private_key", str(keys[0][0])], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert main(["verify", str(folder), "--key", str(keys[0][1]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] and out["card"] is None and out["key"] == str(keys[0][1])


def test_cli_sign_and_verify(keys, tmp_path, capsys):
    folder = _adapter(tmp_path / "adapter", seed=0)
    assert main(["sign", str(folder), "--key", str(keys[0][0]), "--creator", "bo"]) == 0
    assert main(["verify", str(folder), "--key", str(keys[0][1])]) == 0
    assert "verified" in capsys.readouterr().out
    assert main(["verify", str(folder), "--key", str(keys[1][1])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "signed by another key" in err


@pytest.mark.parametrize("tamper, named", [
    (lambda f: _flip_last_byte(f / "adapter_model.safetensors"), "adapter_model.safetensors was modified after signing"),
    (lambda f: _edit_rank(f / "adapter_config.json"), "adapter_config.json was modified after signing"),
    (lambda f: (f / "extra.py").write_text("print('hi')\n"), "extra.py was added after signing"),
    (lambda f: (f / "train_report.json").unlink(), "train_report.json was removed after signing"),
    (lambda f: (f / "train_report.json").rename(f / "report.json"), "train_report.json was renamed to report.json"),
    (lambda f: _edit_card(f), f"{CARD_NAME} was edited after signing"),
])
def test_tampering_is_named(copy, keys, tamper, named):
    tamper(copy)
    assert named in _refused(copy, keys[0][1])


def test_another_key_is_refused(copy, keys):
    assert "signed by another key: none of the given keys" in _refused(copy, keys[1][1])


def test_a_signature_copied_from_another_adapter_is_refused(signed, keys, tmp_path):
    other = _adapter(tmp_path / "other", seed=1)
    sign_adapter(other, keys[0][0])
    shutil.copy(signed / "model.sig", other / "model.sig")
    assert "model.sig belongs to another adapter" in _refused(other, keys[0][1])


def test_a_signature_that_ignores_the_weights_is_refused(keys, tmp_path):
    folder = _adapter(tmp_path / "adapter", seed=0)
    subprocess.run([MODEL_SIGNING, "sign", "key", str(folder), "--signature", str(folder / "model.sig"),
                    "--private_key", str(keys[0][0]), "--ignore-paths", str(folder / "adapter_model.safetensors")],
                   check=True, capture_output=True, timeout=120)
    assert "model.sig does not cover adapter_model.safetensors" in _refused(folder, keys[0][1])


def test_an_unreadable_signature_or_a_private_key_to_verify_with_is_one_line(copy, keys):
    assert "a private key; verify with its public key" in _refused(copy, keys[0][0])
    (copy / "model.sig").write_text("not a bundle")
    assert "model.sig: not a signature model-signing can read" in _refused(copy, keys[0][1])


def test_a_stale_card_signed_by_model_signing_is_refused(copy, keys, tmp_path):
    other = _adapter(tmp_path / "other", seed=1)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(other / name, copy / name)
    subprocess.run([MODEL_SIGNING, "sign", "key", str(copy), "--signature", str(copy / "model.sig"),
                    "--private_key", str(keys[0][0])], check=True, capture_output=True, timeout=120)
    assert f"the signed {CARD_NAME} is of another adapter" in _refused(copy, keys[0][1])


def test_an_unsigned_folder_is_refused(keys, tmp_path):
    folder = _adapter(tmp_path / "adapter", seed=0)
    assert "has no model.sig" in _refused(folder, keys[0][1])


def test_the_wrong_base_is_refused(signed, keys, other_base):
    message = _refused(signed, keys[0][1], base_model=other_base)
    assert f"signed for base lorakit-embedded (model.safetensors sha256:" in message and f"not {other_base}" in message


def test_a_card_without_base_weights_is_checked_against_the_adapters_record(keys, other_base, tmp_path):
    model = load_model(None)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    folder = lorakit.save_adapter(model, tmp_path / "adapter")
    sign_adapter(folder, keys[0][0])  # no base_model: the card holds the adapter's own record of its base
    assert verify_adapter(folder, [keys[0][1]], base_model="embedded").card["base"]["name"] == "lorakit-embedded"
    assert "signed for base lorakit-embedded (sha256:" in _refused(folder, keys[0][1], base_model=other_base)


def test_a_non_ec_key_is_one_line_naming_the_file(tmp_path):
    private, _ = _key_pair(tmp_path, "ed", key=ed25519.Ed25519PrivateKey.generate())
    folder = _adapter(tmp_path / "adapter", seed=0)
    with pytest.raises(SignatureError, match=f"{private}: the key is Ed25519, not ECDSA; lorakit signs with ECDSA"):
        sign_adapter(folder, private)
    assert not (folder / "model.sig").exists() and not (folder / CARD_NAME).exists()


def test_keyless_signing_offline_fails_fast_in_one_line(tmp_path):
    folder = _adapter(tmp_path / "adapter", seed=0)
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # no network
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "lorakit.cli", "sign", str(folder), "--sigstore"], env=env,
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert time.monotonic() - start < 30
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "keyless signing failed" in result.stderr and "--key PRIVATE.pem" in result.stderr
    assert not (folder / "model.sig").exists() and not (folder / CARD_NAME).exists()


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _edit_rank(path: Path) -> None:
    """A one-byte change that keeps adapter_config.json valid JSON."""
    path.write_bytes(path.read_bytes().replace(b'"r": 4', b'"r": 8'))


def _edit_card(folder: Path) -> None:
    card = json.loads((folder / CARD_NAME).read_text())
    card["creator"] = "mallory"
    (folder / CARD_NAME).write_text(json.dumps(card))


def test_the_registry_stores_only_what_a_trusted_key_signed_and_shows_the_check(copy, keys, tmp_path, capsys):
    """`lorakit registry add --trusted-key` verifies before storing; `show --trusted-key` verifies the stored copy."""
    from lorakit.cli import main

    (_, signer_public), (_, other_public) = keys
    registry = str(tmp_path / "registry")
    assert main(["registry", "add", str(copy), "--name", "reverse", "--registry", registry,
                 "--trusted-key", str(signer_public)]) == 0
    assert "signature verified with signer.pub.pem" in capsys.readouterr().out
    assert main(["registry", "show", "reverse", "--registry", registry, "--trusted-key", str(signer_public)]) == 0
    assert "signature: verified with signer.pub.pem" in capsys.readouterr().out
    assert main(["registry", "show", "reverse", "--registry", registry, "--trusted-key", str(other_public)]) == 1
    out = capsys.readouterr().out
    assert "signature: NOT VERIFIED: " in out and "signed by another key" in out

    (copy / "adapter_config.json").write_text((copy / "adapter_config.json").read_text() + " ")
    assert main(["registry", "add", str(copy), "--name", "tampered", "--registry", registry,
                 "--trusted-key", str(signer_public)]) == 2
    assert "adapter_config.json was modified after signing" in capsys.readouterr().err
    assert main(["registry", "show", "tampered", "--registry", registry]) == 2   # never stored


def test_a_server_shows_the_card_with_data_files_by_name_and_a_damaged_card_as_an_error(tmp_path):
    from lorakit.signing.card import CARD_NAME, shown_card

    folder = tmp_path / "adapter"
    folder.mkdir()
    assert shown_card(folder) is None
    card = {"format": "lorakit-card/1", "data": {"data": {"path": "/srv/private/train.jsonl", "sha256": "sha256:ab"},
                                                 "skill": "reverse_words"}}
    (folder / CARD_NAME).write_text(json.dumps(card))
    shown = shown_card(folder)
    assert shown["data"] == {"data": {"path": "train.jsonl", "sha256": "sha256:ab"}, "skill": "reverse_words"}
    (folder / CARD_NAME).write_text("{not json")
    error = shown_card(folder)["error"]
    assert error.startswith(f"{CARD_NAME}: not a readable JSON file") and str(folder) not in error, error
    (folder / CARD_NAME).write_text(json.dumps({"format": "lorakit-card/1", "padding": "x" * (300 * 1024)}))
    assert "larger than" in shown_card(folder)["error"]
