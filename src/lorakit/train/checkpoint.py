"""Checkpoints that hold a run's full state, written atomically, and resumed to the bit.

A checkpoint is a folder `checkpoints/step-000120/`:
    trainable.safetensors   every trainable parameter, by its name in the model
    optimizer.safetensors   the optimizer's per-parameter tensors (AdamW: step, exp_avg, exp_avg_sq), key "<index>.<name>"
    rng.safetensors         the torch CPU (and CUDA) generator states; of a run on several processes, rank r's
                            as "rank<r>.torch", "rank<r>.cuda0" (rank 0's under the plain names)
    state.json              step, position in the data, the optimizer's hyperparameters, the scheduler, Python's RNG,
                            and "batching": the processes and the micro-batches per optimizer step it ran with
    adapter/                the adapter in PEFT's format, usable as is
No pickle anywhere: a checkpoint can be loaded without trusting whoever wrote it. Tensors are stored whole
(a sharded run gathers them first), so a checkpoint resumes on any number of processes.

Atomicity: the folder is written under a temporary name, each file fsynced, then renamed into place, and
only then `checkpoints/latest.json` is replaced (write + fsync + rename). A kill at any moment leaves
`latest.json` pointing at a complete checkpoint; a half-written folder keeps its temporary name and is
swept away on the next save.

Resuming trusts nothing it reads: `latest.json` must point at a folder inside `checkpoints/` (symlinks
followed), and `state.json` must have the shape `save_checkpoint` writes, or the run stops with a TrainError
naming the file.
"""

from __future__ import annotations

import dataclasses
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
from lorakit.io.safetensors_file import atomic_write, current_umask, fsync_path

LATEST = "latest.json"


@dataclass
class Position:
    """Where a run stands: `step` optimizer steps done; the next micro-batch is `batch` of `epoch`."""
    step: int = 0
    epoch: int = 0
    batch: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))
    os.chmod(path, 0o666 & ~current_umask())     # safetensors creates its files 0600 whatever the umask
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _optimizer_parts(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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


def rng_states() -> dict[str, torch.Tensor]:
    """This process's torch generator states (CPU, and every CUDA device)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def save_checkpoint(folder: Path, *, model, optimizer, scheduler, position: Position, save_adapter_to,
                    keep: int, optimizer_state: Optional[dict] = None, rng: Optional[dict] = None,
                    batching: tuple[int, int] = (1, 1)) -> Path:
    """Write checkpoint `step-<position.step>` under `folder` atomically; keep the newest `keep` of them.

    optimizer_state / rng: what to save instead of `optimizer.state_dict()` / this process's generators (a
    run on several processes passes the gathered ones). batching: (processes, micro-batches per step).
    """
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{position.step:06d}"
    for stale in folder.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f".tmp-{name}"
    tmp.mkdir()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _save_tensors(tmp / "trainable.safetensors", trainable)
    opt_tensors, opt_meta = _optimizer_parts(optimizer_state or optimizer.state_dict())
    _save_tensors(tmp / "optimizer.safetensors", opt_tensors)
    _save_tensors(tmp / "rng.safetensors", rng or rng_states())
    save_adapter_to(tmp / "adapter")
    state = {"position": position.__dict__, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
             "python_random": _jsonable_random_state(random.getstate()),
             "batching": {"processes": batching[0], "micro_batches_per_step": batching[1]}}
    (tmp / "state.json").write_text(json.dumps(state))
    with open(tmp / "state.json", "rb") as handle:
        os.fsync(handle.fileno())
    fsync_path(tmp)
    final = folder / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(folder)
    atomic_write(folder / LATEST, lambda path: path.write_text(json.dumps({"step": position.step, "path": name})))
    fsync_path(folder)
    steps = {step: p for p in folder.glob("step-*") if p.is_dir() and (step := _step_of(p)) is not None}
    for step in sorted(steps)[:-keep]:  # by number: past step 999999 the names no longer sort
        shutil.rmtree(steps[step], ignore_errors=True)
    return final


def _step_of(checkpoint: Path) -> Optional[int]:
    """The step a `step-<n>` folder was saved at; None for a folder lorakit did not name."""
    digits = checkpoint.name[len("step-"):]
    return int(digits) if digits.isascii() and digits.isdigit() else None


def _jsonable_random_state(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The checkpoint `latest.json` points at, or None when the run never saved one."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    try:
        target = (folder / json.loads(pointer.read_text())["path"]).resolve()
    except (ValueError, KeyError, TypeError, RecursionError):
        raise TrainError(f"{pointer} is damaged; delete it to resume from the newest complete checkpoint folder, "
                         "or start again with --overwrite") from None
    if not target.is_relative_to(folder.resolve()) or target == folder.resolve():
        raise TrainError(f"{pointer} points at {target}, outside {folder}; a run resumes only from its own "
                         "checkpoints. Delete it to resume from the newest checkpoint folder, or start again "
                         "with --overwrite")
    if not (target / "state.json").is_file():
        raise TrainError(f"{pointer} points at {target}, which is incomplete; start again with --overwrite")
    return target


@dataclass
class Contents:
    """A checkpoint read and checked against the live run, not yet applied: plain tensors and JSON values."""
    path: Path
    state: dict
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]


def read_checkpoint(path: Path, *, model, optimizer, scheduler) -> Contents:
    """Read what `save_checkpoint` wrote, refusing (TrainError) a file that does not fit this run."""
    state = _read_state(path / "state.json", optimizer, scheduler)
    try:
        trainable = load_file(str(path / "trainable.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError) as exc:
        raise TrainError(f"checkpoint {path} cannot be read ({exc}); start again with --overwrite") from None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(trainable):
        missing, extra = sorted(set(params) - set(trainable)), sorted(set(trainable) - set(params))
        raise TrainError(f"checkpoint {path} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    wrong = [n for n, p in params.items() if tuple(trainable[n].shape) != tuple(p.shape)]
    if wrong:
        raise TrainError(f"checkpoint {path} does not fit this model: {wrong[0]} is {tuple(trainable[wrong[0]].shape)}, "
                         f"the model's is {tuple(params[wrong[0]].shape)}")
    return Contents(path, state, trainable, opt_tensors, rng)


def apply_checkpoint(contents: Contents, *, model, optimizer, scheduler, rank: int = 0,
                     place=lambda tensor, like: tensor) -> tuple[Position, bool]:
    """Put a read checkpoint into the live objects; (the position to go on from, whether this rank's generator
    states were in it). `place(whole, like)` turns a saved tensor into what the live one holds (a shard)."""
    path, state = contents.path, contents.state
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(place(contents.trainable[name], param))
    by_index = [p for group in optimizer.param_groups for p in group["params"]]
    opt_tensors = {}
    for key, value in contents.optimizer.items():
        index = int(key.split(".", 1)[0])
        opt_tensors[key] = place(value, by_index[index]) if index < len(by_index) else value
    try:
        _restore_optimizer(optimizer, opt_tensors, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        version, internal, gauss = state["python_random"]
        random.setstate((version, tuple(internal), gauss))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise TrainError(f"{path / 'state.json'} does not fit this run ({type(exc).__name__}: {exc}); start "
                         "again with --overwrite") from None
    prefix = f"rank{rank}." if rank else ""
    rng = {k[len(prefix):]: v for k, v in contents.rng.items() if k.startswith(prefix) and
           (prefix or not k.startswith("rank"))}
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return Position(**state["position"]), "torch" in rng


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> Position:
    """Restore everything `save_checkpoint` wrote into the live objects; return the position to go on from."""
    contents = read_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    return apply_checkpoint(contents, model=model, optimizer=optimizer, scheduler=scheduler)[0]


def saved_batching(folder: Path) -> Optional[tuple[int, int]]:
    """(processes, micro-batches per step) of the latest checkpoint in `folder`; None when there is none, and
    (1, None) for a checkpoint of a single-process run saved before batching was recorded."""
    latest = latest_checkpoint(folder)
    if latest is None:
        return None
    try:
        batching = json.loads((latest / "state.json").read_text()).get("batching")
        processes, per_step = batching["processes"], batching["micro_batches_per_step"]
    except (OSError, ValueError, AttributeError, KeyError, TypeError, RecursionError):
        return 1, None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (processes, per_step)):
        raise TrainError(f"{latest / 'state.json'}: batching must hold two positive whole numbers; start again "
                         "with --overwrite")
    return processes, per_step


def _read_state(file: Path, optimizer, scheduler) -> dict:
    """state.json, checked against the shape the live run would save; a TrainError naming the file if not."""
    def damaged(why: str) -> TrainError:
        return TrainError(f"{file} is damaged or was not written by lorakit ({why}); start again with --overwrite")

    try:
        state = json.loads(file.read_text())
    except RecursionError:
        raise damaged("nested too deeply") from None
    except (OSError, ValueError) as exc:
        raise damaged(f"not readable JSON: {exc}") from None
    if not isinstance(state, dict):
        raise damaged(f"a JSON {type(state).__name__} where an object belongs")
    optimizer_state = state.get("optimizer")
    expected = [("position", state.get("position"), dataclasses.asdict(Position())),
                ("scheduler", state.get("scheduler"), scheduler.state_dict()),
                ("optimizer.param_groups", optimizer_state.get("param_groups") if isinstance(optimizer_state, dict)
                 else None, optimizer.state_dict()["param_groups"])]
    for where, saved, live in expected:
        if not _fits(saved, live):
            raise damaged(f"{where} is missing or does not have the keys and types this run saves")
    if not isinstance(optimizer_state.get("scalars"), dict) or not isinstance(state.get("python_random"), list):
        raise damaged("optimizer.scalars or python_random is missing")
    return state


def _fits(saved: Any, live: Any) -> bool:
    """Has JSON value `saved` the shape of `live`: the same keys, list lengths and kinds of value?"""
    if isinstance(live, dict):
        return isinstance(saved, dict) and saved.keys() == live.keys() and all(_fits(saved[k], live[k]) for k in live)
    if isinstance(live, (list, tuple)):
        return isinstance(saved, list) and len(saved) == len(live) and all(map(_fits, saved, live))
    if isinstance(live, float):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool)
    return type(saved) is type(live)  # int, bool, str, None
