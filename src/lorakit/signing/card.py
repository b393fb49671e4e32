"""`lorakit_card.json`: what a signature vouches for, beyond the bytes of the files.

Written into the adapter folder before signing, so the signed manifest covers its hash:

    format       "lorakit-card/1"
    adapter      {"digest": Adapter.digest}: sha256 over adapter_config.json and adapter_model.safetensors
    base         the base the adapter was saved on, as its weights file records it (name, source, digest of
                 sampled base rows: io.base_record), and with `--model` the model given and the sha256 of
                 each of its weight files ("weights": {file: "sha256:..."})
    data         per train_config.json entry ("data", "eval_data") that names an existing file or folder:
                 its path as recorded and its sha256 (a folder: over its files' names and hashes); or
                 {"skill": NAME} for lorakit's example skills; {} when the folder holds no train_config.json
    eval         train_report.json's eval_before / eval_after, when present
    composition  for an adapter made by `lorakit compose`: its composition.json (method, inputs' digests and
                 weights, rank, density, seed, the collision check), when present
    routing      the routing signature beside the adapter (`lorakit route-index`, `lorakit train`): its file,
                 sha256, layer and number of prompts, when present (docs/routing.md)
    creator      who signed (`--creator`, default user@host)
    date         when, UTC ISO 8601
"""

from __future__ import annotations

import getpass
import hashlib
import json
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Union

from lorakit.errors import SignatureError
from lorakit.io.adapter import Adapter
from lorakit.io.model_card import read_run_files
from lorakit.io.safetensors_file import atomic_write

CARD_NAME = "lorakit_card.json"
CARD_FORMAT = "lorakit-card/1"
COMPOSITION_NAME = "composition.json"     # written by `lorakit compose`
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # what a base model folder's weights are in
DATA_FIELDS = ("data", "eval_data")
SHOWN_CARD_BYTES = 256 * 1024  # the largest card a server shows (in every /v1/models answer)


def build_card(folder: Union[str, Path], *, creator: Optional[str] = None,
               base_model: Optional[Union[str, Path]] = None) -> dict:
    """The card of the adapter in `folder` (read and checked with `Adapter.read`); nothing is written."""
    folder = Path(folder)
    adapter = Adapter.read(folder, allow_hub=False)
    record = adapter.base
    base = {"name": record.name, "source": record.source, "digest": record.digest} if record else \
        {"name": None, "source": None, "digest": None}
    if base_model is not None:
        base["model"], base["weights"] = describe_base(base_model)
    train_config, report = read_run_files(folder)
    composition = _json_file(folder / COMPOSITION_NAME)
    return {
        "format": CARD_FORMAT,
        "adapter": {"digest": adapter.digest},
        "base": base,
        "data": _data(train_config or {}),
        "eval": {k: report[k] for k in ("eval_before", "eval_after") if report and report.get(k) is not None},
        "creator": creator or f"{getpass.getuser()}@{socket.gethostname()}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **({"composition": composition} if composition is not None else {}),
        **({"routing": routing} if (routing := routing_entry(folder)) is not None else {}),
    }


def routing_entry(folder: Path) -> Optional[dict]:
    """The card's line for the routing signature in `folder`, None when it has none."""
    from lorakit.engine.routing import ROUTING_FILE, RoutingSignature

    signature = RoutingSignature.load(folder)
    if signature is None:
        return None
    return {"file": ROUTING_FILE, "sha256": file_sha256(folder / ROUTING_FILE), "layer": signature.layer,
            "prompts": signature.prompts}


def record_routing(folder: Union[str, Path]) -> bool:
    """Put the routing signature's line into an existing lorakit_card.json (nothing else changes); False when the
    folder has no card."""
    path = Path(folder) / CARD_NAME
    card = _json_file(path)
    if card is None:
        return False
    card["routing"] = routing_entry(Path(folder))
    _write_json(path, card)
    return True


def _json_file(path: Path) -> Optional[dict]:
    """A JSON object file beside the adapter, None when absent; a damaged one is an error naming it."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SignatureError(f"{path}: not a readable JSON file ({exc}); restore it or remove it") from None
    if not isinstance(data, dict):
        raise SignatureError(f"{path}: expected a JSON object")
    return data


def shown_card(folder: Union[str, Path]) -> Optional[dict]:
    """The folder's lorakit_card.json as a server shows it to clients (None when there is none): the data
    files by name only, not by the path they were trained from; a damaged card, or one over SHOWN_CARD_BYTES,
    is {"error": why}. Whether a signature vouches for it is the caller's to say (a card is only as good as
    the signature over it)."""
    path = Path(folder) / CARD_NAME
    if path.is_file() and path.stat().st_size > SHOWN_CARD_BYTES:
        return {"error": f"{CARD_NAME} is larger than {SHOWN_CARD_BYTES:,} bytes (a card is a few kB)"}
    try:
        card = _json_file(path)
    except SignatureError as exc:
        return {"error": str(exc).replace(f"{path}: ", f"{CARD_NAME}: ")}
    if card is None:
        return None
    data = card.get("data")
    if isinstance(data, dict):
        card["data"] = {key: {**entry, "path": Path(entry["path"]).name}
                        if isinstance(entry, dict) and isinstance(entry.get("path"), str) else entry
                        for key, entry in data.items()}
    return card


def write_card(folder: Union[str, Path], **options) -> Path:
    """Write `build_card(folder, **options)` as folder/lorakit_card.json (atomically); returns its path."""
    return _write_json(Path(folder) / CARD_NAME, build_card(folder, **options))


def _write_json(path: Path, card: dict) -> Path:
    text = json.dumps(card, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def describe_base(base_model: Union[str, Path]) -> tuple[str, dict[str, str]]:
    """(name, {weight file: "sha256:..."}) of a local base model folder ("embedded": lorakit's own model)."""
    from lorakit.models.loading import EMBEDDED_NAME, resolve_model_path

    folder = Path(resolve_model_path(base_model))
    if not folder.is_dir():
        raise SignatureError(f"--model {base_model}: a hub id; give the model's local folder, whose weight files "
                             "are hashed")
    weights = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.suffix in WEIGHT_SUFFIXES}
    if not weights:
        raise SignatureError(f"--model {base_model}: {folder} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    name = EMBEDDED_NAME if str(base_model) in ("embedded", EMBEDDED_NAME) else str(base_model)
    return name, weights


def file_sha256(path: Path) -> str:
    """"sha256:..." of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def tree_sha256(folder: Path) -> str:
    """sha256 over a folder's files: each relative path and its file_sha256, in path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return "sha256:" + digest.hexdigest()


def _data(train_config: dict) -> dict:
    data = {}
    for key in DATA_FIELDS:
        given = train_config.get(key)
        path = Path(given).expanduser() if isinstance(given, str) else None
        if path is not None and path.is_file():
            data[key] = {"path": given, "sha256": file_sha256(path)}
        elif path is not None and path.is_dir():
            data[key] = {"path": given, "sha256": tree_sha256(path)}
    if not train_config.get("data") and train_config.get("skill"):
        data["skill"] = train_config["skill"]
    return data
