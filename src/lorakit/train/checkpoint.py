"""Checkpoints that hold a run's full state, written atomically, and resumed to the bit.

A checkpoint is a folder `checkpoints/step-000120/`:
    trainable.safetensors   every trainable parameter, by its name in the model
    optimizer.safetensors   the optimizer's per-parameter tensors (AdamW: step, exp_avg, exp_avg_sq), key "<index>.<name>"
    rng.safetensors         the torch CPU (and CUDA) generator states
    state.json              step, position in the data, the optimizer's hyperparameters, the scheduler, Python's RNG
    adapter/                the adapter in PEFT's format, usable as is
No pickle anywhere: a checkpoint can be loaded without trusting whoever wrote it.

Atomicity: the folder is written under a temporary name, each file fsynced, then renamed into place, and
only then `checkpoints/latest.json` is replaced (write + fsync + rename). A kill at any moment leaves
`latest.json` pointing at a complete checkpoint; a half-written folder keeps its temporary name and is
swept away on the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from lorakit.errors import TrainError
from lorakit.io.safetensors_file import atomic_write

LATEST = "latest.json"


@dataclass
class Position:
    """Where a run stands: `step` optimizer steps done; the next micro-batch is `batch` of `epoch`."""
    step: int = 0
    epoch: int = 0
    batch: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})


def save_checkpoint(folder: Path, *, model, optimizer, scheduler, position: Position, save_adapter_to,
                    keep: int) -> Path:
    """Write checkpoint `step-<position.step>` under `folder` atomically; keep the newest `keep` of them."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{position.step:06d}"
    for stale in folder.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f".tmp-{name}"
    tmp.mkdir()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _save_tensors(tmp / "trainable.safetensors", trainable)
    opt_tensors, opt_meta = _optimizer_parts(optimizer)
    _save_tensors(tmp / "optimizer.safetensors", opt_tensors)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    _save_tensors(tmp / "rng.safetensors", rng)
    save_adapter_to(tmp / "adapter")
    state = {"position": position.__dict__, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
             "python_random": _jsonable_random_state(random.getstate())}
    (tmp / "state.json").write_text(json.dumps(state))
    with open(tmp / "state.json", "rb") as handle:
        os.fsync(handle.fileno())
    _fsync_dir(tmp)
    final = folder / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(folder)
    atomic_write(folder / LATEST, lambda path: path.write_text(json.dumps({"step": position.step, "path": name})))
    _fsync_dir(folder)
    checkpoints = sorted(p for p in folder.glob("step-*") if p.is_dir())
    for old in checkpoints[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable_random_state(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The checkpoint `latest.json` points at, or None when the run never saved one."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    try:
        target = folder / json.loads(pointer.read_text())["path"]
    except (ValueError, KeyError, TypeError):
        raise TrainError(f"{pointer} is damaged; delete it to resume from the newest complete checkpoint folder, "
                         "or start again with --overwrite") from None
    if not (target / "state.json").is_file():
        raise TrainError(f"{pointer} points at {target}, which is incomplete; start again with --overwrite")
    return target


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> Position:
    """Restore everything `save_checkpoint` wrote into the live objects; return the position to go on from."""
    try:
        state = json.loads((path / "state.json").read_text())
        trainable = load_file(str(path / "trainable.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError) as exc:
        raise TrainError(f"checkpoint {path} cannot be read ({exc}); start again with --overwrite") from None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(trainable):
        missing, extra = sorted(set(params) - set(trainable)), sorted(set(trainable) - set(params))
        raise TrainError(f"checkpoint {path} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(trainable[name])
    _restore_optimizer(optimizer, opt_tensors, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng["torch"])
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return Position(**state["position"])
