"""Load a base model and its tokenizer: the embedded model, a local folder, or a hub id.

`--model` takes whatever `transformers`' Auto classes take. The embedded model (a small Llama pretrained
on Shakespeare and Milton, shipped inside the package) is the default, so a fresh machine can train,
generate and serve with no download. A path that does not exist and does not look like a hub id is
refused with a message naming it, rather than surfacing a long hub traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

import torch

from lorakit.errors import ModelError

EMBEDDED_MODEL = Path(__file__).resolve().parent / "embedded"
EMBEDDED_NAME = "lorakit-embedded"
# owner/name, as the hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(model: Optional[Union[str, Path]]) -> str:
    """The folder or hub id to load: None or "embedded" means the embedded model."""
    if model is None or str(model) in ("embedded", EMBEDDED_NAME):
        if not (EMBEDDED_MODEL / "config.json").is_file():
            raise ModelError(f"the embedded model is missing from {EMBEDDED_MODEL}; reinstall lorakit or run "
                             "scripts/pretrain_embedded.py to rebuild it")
        return str(EMBEDDED_MODEL)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model folder: it has no config.json")
        return str(path)
    if _HUB_ID.match(str(model)) and not str(model).startswith((".", "/", "~")):
        return str(model)
    raise ModelError(f"model {str(model)!r} not found: no such folder, and it is not a hub id (owner/name)")


def load_tokenizer(model: Optional[Union[str, Path]]):
    from transformers import AutoTokenizer

    resolved = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {resolved}: {str(exc).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of {resolved} has no EOS token; a trained model could not learn to stop")
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out by position, never by id, so reusing EOS here is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: Optional[Union[str, Path]], dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device] = "cpu"):
    """An `AutoModelForCausalLM` in eval mode, weights in `dtype`, on `device`."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model_path(model)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a causal language model from {resolved}: {str(exc).splitlines()[0]}") from None
    return loaded.to(device).eval()
