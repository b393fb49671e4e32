"""Load a base model and its tokenizer: the embedded model, a local folder, or a hub id.

`--model` takes whatever `transformers`' Auto classes take. The embedded model (a small Llama pretrained
on Shakespeare and Milton, shipped inside the package) is the default, so a fresh machine can train,
generate and serve with no download. A path that does not exist and does not look like a hub id is
refused with a message naming it, rather than surfacing a long hub traceback. A hub id goes through
models/hub.py: on a machine that cannot reach the hub it loads from the local cache, or fails in seconds
with one line saying what to do.

Weights are read from safetensors only, unless the caller passes `trust_pickle` (`--trust-pickle`):
`pytorch_model.bin` and friends are pickles, and unpickling runs whatever code the file's author put in.
A local folder with pickle weights and no safetensors is refused with a message saying so; for a hub id,
transformers is told to load safetensors only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional, TypeVar, Union

import torch

from lorakit.errors import ModelError
from lorakit.io.safetensors_file import PICKLE_SUFFIXES
from lorakit.models.hub import from_hub

EMBEDDED_MODEL = Path(__file__).resolve().parent / "embedded"
EMBEDDED_NAME = "lorakit-embedded"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the names flags use
HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*")  # owner/name, as the hub spells repository ids
T = TypeVar("T")


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
    if HUB_ID.fullmatch(str(model)) and ".." not in str(model):
        return str(model)
    raise ModelError(f"model {str(model)!r} not found: no such folder, and it is not a hub id (owner/name)")


def _pretrained(resolved: str, load: Callable[[bool], T]) -> T:
    """load(local_files_only): a local folder as is, a hub id through the hub rule (models/hub.py)."""
    return load(False) if Path(resolved).exists() else from_hub(resolved, load)


def load_tokenizer(model: Optional[Union[str, Path]]):
    from transformers import AutoTokenizer

    resolved = resolve_model_path(model)
    try:
        tokenizer = _pretrained(resolved, lambda local_only: AutoTokenizer.from_pretrained(
            resolved, local_files_only=local_only))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {resolved}: {str(exc).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of {resolved} has no EOS token; a trained model could not learn to stop")
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out by position, never by id, so reusing EOS here is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _refuse_pickle_only(folder: Path) -> None:
    """A ModelError if the folder's weights are pickle files alone (no safetensors to read instead)."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{folder} holds its weights only as pickle files ({', '.join(pickles[:3])}), and loading a pickle "
            "can run arbitrary code. Pass --trust-pickle (trust_pickle=True) to load it anyway, only for files "
            "you trust, or convert it to safetensors: save_pretrained(..., safe_serialization=True)")


def load_model(model: Optional[Union[str, Path]], dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device] = "cpu", trust_pickle: bool = False):
    """An `AutoModelForCausalLM` in eval mode, weights in `dtype`, on `device`; pickle weights (`*.bin`)
    only with `trust_pickle`."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model_path(model)
    if not trust_pickle and Path(resolved).is_dir():
        _refuse_pickle_only(Path(resolved))
    try:
        loaded = _pretrained(resolved, lambda local_only: AutoModelForCausalLM.from_pretrained(
            resolved, dtype=dtype, use_safetensors=None if trust_pickle else True, local_files_only=local_only))
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0]
        hint = ("; lorakit reads safetensors weights only unless given --trust-pickle (only for files you trust)"
                if not trust_pickle and "safetensors" in reason else "")
        raise ModelError(f"cannot load a causal language model from {resolved}: {reason}{hint}") from None
    return loaded.to(device).eval()


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: the tokenizer's EOS and the generation config's (e.g. a chat end-of-turn)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)
