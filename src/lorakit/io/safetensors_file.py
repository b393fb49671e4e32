"""Reading and writing adapter weights as safetensors, checked before use.

Pickle (`.bin`, `.pt`) is never loaded: unpickling runs arbitrary code. A safetensors file is parsed by
the `safetensors` library, which rejects a header that does not describe the file exactly (truncation,
overlapping or out-of-range tensors); we add what it does not check: float dtypes only and no NaN/Inf.
Writes are atomic (temporary file, fsync, rename), so an interrupted save never leaves a corrupt file.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorakit.errors import AdapterFileError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HEADER_LIMIT = 100 * 1024 * 1024


# bytes per element of each safetensors dtype (the reference's table)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3")
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                      torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fn: "F8_E4M3", torch.int64: "I64",
                      torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
DTYPE_NAMES = {code: str(dtype).removeprefix("torch.") for dtype, code in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked header: {key: (dtype, shape)} and the file size it describes."""

    shapes: dict[str, tuple[str, tuple[int, ...]]]
    file_size: int


def read_header_bytes(path: Path) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file, without reading any tensor data."""
    size = path.stat().st_size
    if size < 8:
        raise AdapterFileError(f"{path}: only {size} bytes; a safetensors file starts with an 8-byte header "
                               "length. The file is truncated or not safetensors.")
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > min(_HEADER_LIMIT, size - 8):
            raise AdapterFileError(f"{path}: header length {header_len} exceeds the file ({size} bytes); the file "
                                   "is truncated or not safetensors")
        return struct.pack("<Q", header_len) + handle.read(header_len)


def _no_duplicates(pairs: list) -> dict:
    """A JSON object's pairs as a dict, refusing a key that appears twice (parsers disagree on which wins).
    Linear in the number of keys: a header may hold millions of them."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {twice!r} appears twice")
    return result


def parse_header(data: bytes, file_size: int, source: str) -> SafetensorsHeader:
    """Check a header as the reference parser does (safetensors' Metadata::validate): a JSON object with
    no duplicate keys; tensors laid end to end from offset 0 with no gap or overlap, each exactly
    prod(shape) * dtype size bytes, the last ending at the end of the file."""
    (header_len,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + header_len], object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterFileError(f"{source}: the safetensors header is not valid JSON ({exc}); the file is "
                               "corrupt") from None
    except RecursionError:
        raise AdapterFileError(f"{source}: the safetensors header is nested too deeply; the file is corrupt") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{source}: the safetensors header is not a JSON object; the file is corrupt")
    entries, shapes = [], {}
    for key, info in header.items():
        if key == "__metadata__":
            if not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise AdapterFileError(f"{source}: __metadata__ must map strings to strings; the file is corrupt")
            continue
        if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}):
            raise AdapterFileError(f"{source}: tensor {key!r} must have exactly dtype, shape and data_offsets in the "
                                   "header; the file is corrupt")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise AdapterFileError(f"{source}: tensor {key!r} has unknown dtype {dtype!r}")
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63  # noqa: E731
        if not (isinstance(shape, list) and len(shape) <= 8 and all(whole(d) for d in shape)):
            raise AdapterFileError(f"{source}: tensor {key!r} has a malformed shape {shape!r} in the header")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(whole(o) for o in offsets)):
            raise AdapterFileError(f"{source}: tensor {key!r} has malformed data_offsets {offsets!r} in the header; "
                                   "the file is corrupt")
        entries.append((offsets[0], offsets[1], key, math.prod(shape) * DTYPE_BYTES[dtype]))
        shapes[key] = (dtype, tuple(shape))
    end = 0
    for start, stop, key, nbytes in sorted(entries):
        if start != end or stop < start:
            raise AdapterFileError(f"{source}: tensor {key!r} starts at byte {start} of the data, expected {end} "
                                   "(tensors must follow each other with no gap or overlap); the file is corrupt")
        if stop - start != nbytes:
            raise AdapterFileError(f"{source}: tensor {key!r} takes {stop - start} bytes but its shape and dtype need "
                                   f"{nbytes}; the file is corrupt")
        end = stop
    data_len = file_size - len(data)
    if end != data_len:
        raise AdapterFileError(f"{source}: the header describes {end} bytes of tensor data but the file holds "
                               f"{data_len}; the file is truncated or corrupt (re-download or re-save it)")
    return SafetensorsHeader(shapes, file_size)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU, after the checks above."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise AdapterFileError(f"{path}: pickle files are never loaded (they can run arbitrary code). Convert it "
                               "to safetensors in a trusted environment, e.g. PEFT's save_pretrained(..., "
                               "safe_serialization=True).")
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file")
    parse_header(read_header_bytes(path), path.stat().st_size, str(path))
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


def checkable(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor, or float8 widened to fp32 (which has no isfinite or max kernel)."""
    return tensor if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else tensor.float()


def count_non_finite(tensor: torch.Tensor) -> int:
    """NaN/Inf entries."""
    return int((~torch.isfinite(checkable(tensor))).sum().item())


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Atomically write `tensors` (contiguous, unshared copies) with PEFT's metadata {"format": "pt"}."""
    path = Path(path)
    for key, tensor in tensors.items():
        bad = count_non_finite(tensor) if tensor.is_floating_point() else 0
        if bad:
            raise AdapterFileError(f"refusing to save {path}: tensor {key!r} holds {bad} NaN/Inf values")
    clean = {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata={"format": "pt"}))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then rename it over `path`.

    The file gets the mode a plain `open(path, "w")` would give it: an existing file's own mode, else
    0o666 less the umask (mkstemp's 0o600 would leave it unreadable to a server, container or team
    running as another user)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~current_umask()
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)        # after writing: a writer may replace the file rather than reuse it
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """This process's umask, read without changing it where Linux shows it (os.umask sets while it reads,
    a race with other threads creating files)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_plain_modes(folder: Path) -> None:
    """Files under `folder` get 0o666 less the umask: safetensors creates its files 0600 whatever the umask,
    which leaves a saved model unreadable to a server or team running as another user."""
    mode = 0o666 & ~current_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (a rename is durable once its folder is synced)."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
