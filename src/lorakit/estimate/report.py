"""What `lorakit estimate` prints: a table, a one-line verdict for a device size, or the same as JSON."""

from __future__ import annotations

import dataclasses
import re

from lorakit.estimate.architecture import Architecture
from lorakit.estimate.footprint import Footprint, Setup, estimate
from lorakit.errors import ConfigError
from lorakit.train.memory import MARGIN, format_bytes

_UNITS = {"": 10**9, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 10**3, "m": 10**6,
          "g": 10**9, "t": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, flag: str = "--device-memory") -> int:
    """'24GB' -> 24·10⁹ bytes, '80 GiB' -> 80·2³⁰, '512MB', '1.5TB'; a bare number is in GB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{flag} {text!r} is not a size; write it like 24GB, 80GiB or 512MB")
    return int(float(match.group(1)) * _UNITS[unit])


def verdict(arch: Architecture, setup: Setup, footprint: Footprint, device: int) -> tuple[bool, str]:
    """(fits, one line): whether training fits in `device` bytes and by how much, or what would make it fit."""
    need, size = footprint.training["total"], _device_text(device)
    if need <= device * (1 - MARGIN):
        return True, f"fits in {size} with {format_bytes(device - need)} to spare (training needs {format_bytes(need)})"
    if need <= device:
        return True, (f"fits in {size}, but only just: training needs {format_bytes(need)}, leaving less than the "
                      f"{MARGIN:.0%} lorakit train keeps free (its pre-flight would refuse the run)")
    line = f"does not fit in {size}: training needs {format_bytes(need)}"
    tried = None
    for flags, change in _smaller_setups(setup):
        tried = flags, estimate(arch, dataclasses.replace(setup, **change)).training["total"]
        if tried[1] <= device * (1 - MARGIN):
            return False, f"{line}; with {tried[0]} it needs {format_bytes(tried[1])}"
    if tried is not None:
        return False, f"{line}, and even {tried[0]} needs {format_bytes(tried[1])}"
    return False, line


def _device_text(device: int) -> str:
    """'24 GB' for a whole number of GB, else format_bytes's form."""
    return f"{device // 10**9} GB" if device % 10**9 == 0 else format_bytes(device)


def _smaller_setups(setup: Setup):
    """Changes that cut training memory, each on top of the last: (their flags, the Setup fields they set)."""
    steps = []
    if not setup.gradient_checkpointing:
        steps.append(("--gradient-checkpointing", "gradient_checkpointing", True))
    if setup.method == "full":
        steps.append(("--method lora", "method", "lora"))
    if setup.method != "qlora":
        steps.append(("--method qlora", "method", "qlora"))
    if setup.batch_size > 1:
        steps.append(("--batch-size 1", "batch_size", 1))
    flags: dict[str, str] = {}
    change: dict = {}
    for flag, name, value in steps:
        flags[name], change[name] = flag, value
        yield " ".join(flags.values()), dict(change)


def as_dict(arch: Architecture, setup: Setup, footprint: Footprint, device: int | None) -> dict:
    """The figures for --json: counts as integers, sizes in bytes."""
    fits, line = verdict(arch, setup, footprint, device) if device else (None, None)
    return {
        "model": arch.source,
        "architecture": {k: v for k, v in dataclasses.asdict(arch).items() if k != "source"},
        "setup": {**dataclasses.asdict(setup), "target_modules": footprint.targets or None},
        "parameters": footprint.parameters, "trainable_parameters": footprint.trainable,
        "quantized_parameters": footprint.quantized,
        "adapter_file_bytes": footprint.adapter_file, "model_file_bytes": footprint.model_file,
        "file_dtype": "fp16/bf16",
        "training_bytes": footprint.training, "inference_bytes": footprint.inference,
        "device_memory_bytes": device, "fits": fits, "verdict": line,
    }


def as_text(arch: Architecture, setup: Setup, footprint: Footprint, device: int | None) -> str:
    lines = [f"{arch.source}: {arch.describe()}", _setup_line(setup, footprint), ""]
    share = footprint.trainable / footprint.parameters
    lines.append(f"parameters    {footprint.parameters:,} ({_short(footprint.parameters)}), trainable "
                 f"{footprint.trainable:,} ({_short(footprint.trainable)}, {share:.4%})")
    if footprint.adapter_file is not None:
        lines.append(f"adapter file  {format_bytes(footprint.adapter_file)} in fp16/bf16 "
                     f"({format_bytes(2 * footprint.adapter_file)} in fp32, as lorakit train saves it); "
                     f"the full model: {format_bytes(footprint.model_file)}")
    else:
        lines.append(f"model file    {format_bytes(footprint.model_file)} in fp16/bf16")
    lines += ["", f"{'memory':<14}{'training':>12}{'inference':>12}"]
    train, serve = footprint.training, footprint.inference
    for name, label in (("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer"),
                        ("activations", "activations"), ("kv_cache", "KV cache"), ("total", "total")):
        left = format_bytes(train[name]) if name in train else "-"
        right = format_bytes(serve[name]) if name in serve else "-"
        lines.append(f"  {label:<12}{left:>12}{right:>12}")
    if device:
        lines += ["", verdict(arch, setup, footprint, device)[1]]
    return "\n".join(lines)


def _short(n: int) -> str:
    """'18.87M', '174.60B'."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _setup_line(setup: Setup, footprint: Footprint) -> str:
    if setup.method == "full":
        what = f"full fine-tune in {setup.dtype}"
    else:
        quant = ", base linears in NF4" if setup.method == "qlora" else ""
        leaves = [name.rsplit(".", 1)[-1] for name in footprint.targets]
        names = leaves if len(set(leaves)) == len(leaves) else footprint.targets  # gpt2 has two c_proj
        what = (f"{setup.method} r={setup.r} on {', '.join(names)} "
                f"({setup.adapter_dtype} adapters, {setup.dtype} base{quant})")
    checkpointing = "gradient checkpointing" if setup.gradient_checkpointing else "no gradient checkpointing"
    return (f"{what}\nbatch {setup.batch_size} x {setup.max_length} tokens, {setup.attention} attention, "
            f"{setup.optimizer}, {checkpointing}")
