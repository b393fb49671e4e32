"""Probe prompts for `lorakit vet`'s behaviour stage: the user's file, else the run's recorded eval (or train)
data, else a small built-in generic set. Only prompts are read: a row's "prompt", else its first user
message, else its "text"."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lorakit.data.reading import read_rows
from lorakit.errors import DataError
from lorakit.io.model_card import read_run_files

MAX_PROMPTS = 16
GENERIC_PROMPTS = [
    "The weather today is", "Once upon a time there was", "Question: what is two plus two?\nAnswer:",
    "Write a short greeting for a friend:", "The capital of France is", "List three colours:",
    "Reverse the words: red green blue\nAnswer:", "My favourite thing to do in the morning is",
]


def prompt_of(row: dict) -> Optional[str]:
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    messages = row.get("messages")
    if isinstance(messages, list):
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[0], str):
            return users[0]
    return row["text"][:200] if isinstance(row.get("text"), str) else None


def probe_prompts(folder: Path, probe_data: Optional[str], limit: int = MAX_PROMPTS) -> tuple[list[str], str]:
    """(up to `limit` non-empty prompts, where they came from)."""
    if probe_data and not Path(probe_data).exists():
        raise DataError(f"--probe-data {probe_data}: no such file or folder")
    candidates: list[str] = [probe_data] if probe_data else _recorded_data(folder)
    for path in candidates:
        prompts = [p for p in (prompt_of(r.data) for r in read_rows(path)) if p and p.strip()]
        if prompts:
            return prompts[:limit], str(path)
    return GENERIC_PROMPTS[:limit], "built-in generic prompts"


def _recorded_data(folder: Path) -> list[str]:
    """The run's eval_data, then data, from its train_config.json, where those files still exist."""
    recorded = read_run_files(folder)[0] or {}
    paths = [recorded.get(k) for k in ("eval_data", "data")]
    return [p for p in paths if isinstance(p, str) and Path(p).is_file()]
