"""`write_model_card(folder, ...)`: the README.md of an adapter folder, a model card the hub understands.

Written from what the folder holds (the adapter's config and the base it recorded, io.base_record) and,
after `lorakit train`, the run's settings (train_config.json) and report (train_report.json):

    ---
    library_name: peft            front matter the hub reads: the adapter opens as a PEFT model,
    base_model: owner/name        linked to its base (only when the base is a hub id)
    tags: [lora, lorakit]
    ---
    the base (name or path, and the digest of its weights), the data (files, rows, tokens), the
    settings (rank, alpha, targets, lr, steps or epochs, batch, precision), the held-out scores before
    and after training (exact match, loss), and how to load it with PEFT, vLLM and lorakit.

The loading instructions name the base as it was recorded: a hub id, or a local folder's path as it was
given. A moved base is the same base: pass its new path, and `lorakit merge` (or `check_base`) still
recognises it by its weights' digest.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from pathlib import Path
from typing import Optional, Union

from lorakit.io.adapter import Adapter, split_key
from lorakit.io.inspect import vllm_max_lora_rank, vllm_problems
from lorakit.io.safetensors_file import atomic_write

CARD_NAME = "README.md"
EMBEDDED_IMPORT = "from lorakit.models import EMBEDDED_MODEL as BASE  # lorakit's embedded base model"


def write_model_card(folder: Union[str, Path], *, train_config: Optional[dict] = None,
                     report: Optional[dict] = None, adapter_id: Optional[str] = None) -> Path:
    """Write (atomically) and return `folder`/README.md for the adapter in `folder`.

    train_config / report: `lorakit train`'s resolved settings and report (None: the card says only
    what the adapter itself records). adapter_id: how the card's instructions name the adapter (default:
    the folder as given; `push_adapter` passes the hub repository id).
    """
    folder = Path(folder)
    adapter = Adapter.read(folder, allow_hub=False)
    text = model_card(adapter, train_config or {}, report or {}, adapter_id or str(folder))
    path = folder / CARD_NAME
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def read_run_files(folder: Union[str, Path]) -> tuple[Optional[dict], Optional[dict]]:
    """(train_config.json, train_report.json) of a `lorakit train` output folder, None where absent or not a
    JSON object (a card without the run's details beats no card)."""
    return read_json_object(Path(folder) / "train_config.json"), read_json_object(Path(folder) / "train_report.json")


def read_json_object(path: Path) -> Optional[dict]:
    """A JSON object file, None where it is absent, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def model_card(adapter: Adapter, train_config: dict, report: dict, adapter_id: str) -> str:
    base_name = _base_name(adapter, train_config)
    hub_base = adapter.base is not None and adapter.base.source == "hub"
    front = ["---", "library_name: peft"] + ([f"base_model: {base_name}"] if hub_base else [])
    front += ["tags:", "- lora", "- lorakit", "---", ""]
    title = adapter_id.rstrip("/").split("/")[-1] or "adapter"
    intro = [f"# {title}", "", f"A LoRA adapter in Hugging Face PEFT's format, made with lorakit "
             f"(rank {adapter.rank}, {adapter.num_parameters:,} parameters, {adapter.file_bytes:,} bytes).", ""]
    sections = [_base(adapter, base_name), _data(train_config, report), _settings(adapter, train_config, report),
                _evaluation(report), _usage(adapter, base_name, adapter_id)]
    return "\n".join(front + intro + [line for section in sections for line in section])


def _base_name(adapter: Adapter, train_config: dict) -> Optional[str]:
    if adapter.base is not None and adapter.base.name is not None:
        return adapter.base.name
    return adapter.config.base_model_name_or_path or train_config.get("model")


def _base(adapter: Adapter, base_name: Optional[str]) -> list[str]:
    record = adapter.base
    lines = ["## Base model", ""]
    kind = {"hub": "a Hugging Face hub id", "local": "a local folder, the path as it was given when saved",
            "embedded": "lorakit's embedded base model (`--model lorakit-embedded`)",
            "memory": "a model built in memory"}
    where = kind.get(record.source, "") if record is not None else "not recorded"
    lines.append(f"- **{base_name or 'unknown'}** ({where})")
    if record is not None and record.digest:
        lines += [f"- weights digest: `{record.digest}` (sha256 over the adapted modules' weights, sampled rows "
                  "in fp32: it does not depend on where the base lies or the precision it is stored in)",
                  "- `lorakit merge` compares a model with it: it refuses a model that already holds this adapter "
                  "merged, and warns about a model that is another base"]
    return lines + [""]


def _data(train_config: dict, report: dict) -> list[str]:
    data = report.get("data") or {}
    train = data.get("train")
    files = train_config.get("data") or (train if isinstance(train, str) else None)
    if not (files or train_config.get("skill") or data):
        return []
    lines = ["## Data", ""]
    if files:
        lines.append(f"- training rows: {files}")
    elif train_config.get("skill"):
        lines.append(f"- training rows: lorakit's example skill `{train_config['skill']}`")
    heldout = train_config.get("eval_data") or data.get("heldout")
    if heldout:
        lines.append(f"- held out: {heldout}")
    if isinstance(train, dict):
        lines.append(f"- {train.get('examples', 0):,} training examples, {train.get('tokens', 0):,} tokens "
                     f"({train.get('label_tokens', 0):,} of them trained on), {train.get('truncated', 0)} truncated")
    return lines + [""]


def _settings(adapter: Adapter, train_config: dict, report: dict) -> list[str]:
    config = adapter.config
    targets = config.target_modules if isinstance(config.target_modules, str) else ", ".join(config.target_modules)
    rows = [("rank r", config.r), ("lora_alpha", config.lora_alpha), ("target modules", targets)]
    rows += [(name, "on") for name, on in (("rsLoRA", config.use_rslora), ("DoRA", config.use_dora)) if on]
    steps = report.get("steps") or train_config.get("max_steps")
    schedule = train_config.get("schedule")
    if schedule and train_config.get("warmup_ratio") is not None:
        schedule = f"{schedule}, warmup {train_config['warmup_ratio']:g} of the steps"
    for label, value in (("learning rate", train_config.get("lr")), ("schedule", schedule),
                         ("lora_dropout", train_config.get("lora_dropout")), ("optimizer steps", steps),
                         ("epochs", train_config.get("num_epochs")), ("batch size", train_config.get("batch_size")),
                         ("gradient accumulation", train_config.get("gradient_accumulation_steps")),
                         ("max length (tokens)", train_config.get("max_length")),
                         ("precision", report.get("precision") or train_config.get("precision")),
                         ("quantized base", train_config.get("quantize")), ("seed", train_config.get("seed"))):
        if value is not None:
            rows.append((label, value))
    return ["## Settings", "", "| setting | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def _evaluation(report: dict) -> list[str]:
    before, after = report.get("eval_before"), report.get("eval_after")
    if not (before or after):
        return []

    def cells(scores: Optional[dict]) -> str:
        scores = scores or {}
        match = scores.get("exact_match")
        shown = f"{100 * match:.1f}% of {scores.get('exact_match_samples', '?')}" if match is not None else "-"
        loss = scores.get("loss")
        return f"{shown} | {loss:.4f}" if loss is not None else f"{shown} | -"

    return ["## Held-out evaluation", "", "| | exact match | loss |", "| --- | --- | --- |",
            f"| base model (before) | {cells(before)} |", f"| with this adapter (after) | {cells(after)} |", ""]


def _usage(adapter: Adapter, base_name: Optional[str], adapter_id: str) -> list[str]:
    record = adapter.base
    embedded = record is not None and record.source == "embedded"
    if embedded:
        base_line, cli_base, vllm_base = EMBEDDED_IMPORT, "lorakit-embedded", \
            "\"$(python -c 'from lorakit.models import EMBEDDED_MODEL; print(EMBEDDED_MODEL)')\""
    else:
        shown = base_name or "BASE_MODEL"
        note = "  # the base model: its hub id, or its folder (moved? its new path)"
        base_line, cli_base, vllm_base = f"BASE = {json.dumps(shown)}{note}", shlex.quote(shown), shlex.quote(shown)
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in adapter_id.rstrip("/").split("/")[-1]) or "adapter"
    rank = vllm_max_lora_rank(adapter.rank) or adapter.rank
    parts = Counter(part for part in (split_key(k)[1] for k in adapter.tensors) if part is not None)
    problems = vllm_problems(adapter.config, parts, list(adapter.saved_modules))
    quoted = shlex.quote(adapter_id)
    lines = ["## Use it", "", "With PEFT:", "", "```python", "from peft import PeftModel",
             "from transformers import AutoModelForCausalLM", "", base_line,
             f"ADAPTER = {json.dumps(adapter_id)}  # this folder, or its hub id",
             "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER)", "```", "",
             "With vLLM:", "", "```bash",
             f"vllm serve {vllm_base} --enable-lora --lora-modules {name}={quoted} --max-lora-rank {rank}", "```", ""]
    if problems:
        lines += ["vLLM would refuse this adapter as it is: " + "; ".join(problems) + ".", ""]
    lines += ["With lorakit:", "", "```bash", f"lorakit generate --model {cli_base} --adapter {quoted} \"...\"",
              f"lorakit serve --model {cli_base} --adapter {name}={quoted}", "```", ""]
    return lines
