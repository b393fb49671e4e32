"""Reading and writing adapter weights as safetensors, checked before use.

Pickle (`.bin`, `.pt`) is never loaded: unpickling runs arbitrary code. A safetensors file is parsed by
the `safetensors` library, which rejects a header that does not describe the file exactly (truncation,
overlapping or out-of-range tensors); we add what it does not check: float dtypes only and no NaN/Inf.
Writes are atomic (temporary file, fsync, rename), so an interrupted save never leaves a corrupt file.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorakit.errors import AdapterFileError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HEADER_LIMIT = 100 * 1024 * 1024


def _check_header(path: Path) -> None:
    """Fail with a readable reason before handing the file to the parser."""
    size = path.stat().st_size
    if size < 8:
        raise AdapterFileError(f"{path}: only {size} bytes; a safetensors file starts with an 8-byte header "
                               "length. The file is truncated or not safetensors.")
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > min(_HEADER_LIMIT, size - 8):
            raise AdapterFileError(f"{path}: header length {header_len} exceeds the file ({size} bytes); the file "
                                   "is truncated or not safetensors")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterFileError(f"{path}: the safetensors header is not valid JSON ({exc}); the file is "
                                   "corrupt") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
    data_len = size - 8 - header_len
    ends = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            raise AdapterFileError(f"{path}: tensor {key!r} has malformed data_offsets {offsets!r} in the header; "
                                   "the file is corrupt")
        ends.append(offsets[1])
    if ends and max(ends) != data_len:
        raise AdapterFileError(f"{path}: the header describes {max(ends)} bytes of tensor data but the file holds "
                               f"{data_len}; the file is truncated or corrupt (re-download or re-save it)")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU, after the checks above."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise AdapterFileError(f"{path}: pickle files are never loaded (they can run arbitrary code). Convert it "
                               "to safetensors in a trusted environment, e.g. PEFT's save_pretrained(..., "
                               "safe_serialization=True).")
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file")
    _check_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{path}: not a valid safetensors file ({exc})") from None
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterFileError(f"{path}: tensor {key!r} has dtype {tensor.dtype}; adapter weights must be "
                                   "floating point")
        bad = count_non_finite(tensor)
        if bad:
            raise AdapterFileError(f"{path}: tensor {key!r} holds {bad} NaN/Inf values of {tensor.numel()}; the "
                                   "adapter diverged during training or the file is corrupt")
    return tensors


def count_non_finite(tensor: torch.Tensor) -> int:
    """NaN/Inf entries; float8 has no isfinite kernel, so small float types are widened first."""
    values = tensor if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else tensor.float()
    return int((~torch.isfinite(values)).sum().item())


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Atomically write `tensors` (contiguous, unshared copies) with PEFT's metadata {"format": "pt"}."""
    path = Path(path)
    for key, tensor in tensors.items():
        bad = count_non_finite(tensor) if tensor.is_floating_point() else 0
        if bad:
            raise AdapterFileError(f"refusing to save {path}: tensor {key!r} holds {bad} NaN/Inf values")
    clean = {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata={"format": "pt"}))


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
