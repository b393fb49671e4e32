"""The compiled CPU path of the multi-adapter LoRA update (`lora_cpu.cpp`), of paged decode attention
(`paged_attention_cpu.cpp`, used by `runner.py`) and of the base projections in panels
(`linear_panels_cpu.cpp`, used by `projection.py`), and their loader.

`SlotLora` reads every row's factors straight from the slots (no gather, no copy), one adapter's or a
mixture's (each row's (slot, weight) pairs, see `mixture.py`), and bf16 or fp16 slots are widened as they
are read, so a batch of 16 distinct adapters reads half the bytes it would in fp32. The kernel is compiled
for this machine (`-O3 -march=native`, OpenMP through PyTorch's own thread pool) the first time an engine
starts on a CPU, about 20 s, and cached under ~/.cache/lorakit/kernels (or $LORAKIT_CACHE/kernels); later
starts load it in milliseconds. Where it cannot be built (no C++ compiler, no ninja) the engine logs why
and uses the batched products of `lora_gathered.py`, the reference path the kernel is tested against.
LORAKIT_CPU_KERNEL=0 turns it off.

Importing a `.so` runs its code, so the cache is used only if it is ours: every folder from the cache root
down to the build folder, and any `.so` in it, must belong to this user and be writable by no one else
(lorakit creates the folders 0700). A cache that fails the check is refused with a message saying how to
fix it, and the engine takes the reference path. Builds of one kernel are serialised by a lock the OS
releases if its holder dies; torch's own `lock` file, left behind by a build that was killed, is waited on
for at most LORAKIT_KERNEL_LOCK_TIMEOUT seconds (default 120) before the engine gives up on the kernel.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import torch

from lorakit.engine.mixture import RowLora, pair_tensors

if TYPE_CHECKING:
    from lorakit.engine.lora_slots import LoraSlots

log = logging.getLogger("lorakit.engine")
SOURCES = [Path(__file__).with_name(name)
           for name in ("lora_cpu.cpp", "paged_attention_cpu.cpp", "linear_panels_cpu.cpp")]
LOCK_TIMEOUT_S = 120.0  # about 6x a build; a waiter that gives up still serves, on the reference path


class KernelCacheError(Exception):
    """The kernel cache cannot be trusted or stays locked; the message names the path and what to do."""


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags (a cache shared by several machines stays right)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_root() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lorakit"))


def kernel_build_dir() -> Path:
    """Where this machine's kernel is compiled: one folder per source, torch, Python and CPU."""
    parts = [source.read_bytes() for source in SOURCES] + [torch.__version__.encode(), sys.version.encode(),
                                                            _cpu_signature().encode()]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return _cache_root() / "kernels" / f"lora_cpu_{digest}"


def _check_only_ours(path: Path) -> None:
    """Raise KernelCacheError unless `path` belongs to this user and no one else can write to it."""
    info = path.stat()
    if info.st_uid != os.getuid():
        raise KernelCacheError(
            f"{path} belongs to another user (uid {info.st_uid}), who could plant a kernel there. Run "
            f"`chown -R {os.getuid()} {path}` if it is yours, or point LORAKIT_CACHE at a folder of your own")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KernelCacheError(
            f"{path} can be written by other users (mode {stat.filemode(info.st_mode)}), who could plant a "
            f"kernel there. Run `chmod go-w {path}`, or point LORAKIT_CACHE at a folder of your own")


def _trusted_build_dir() -> Path:
    """The build folder, made (0700) and checked from the cache root down, with any `.so` it holds."""
    build_dir = kernel_build_dir()
    root = _cache_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    for folder in (root, root / "kernels", build_dir):
        folder.mkdir(mode=0o700, exist_ok=True)
        _check_only_ours(folder)
    for library in build_dir.glob("*.so"):
        _check_only_ours(library)
    return build_dir


def _lock_timeout() -> float:
    value = os.environ.get("LORAKIT_KERNEL_LOCK_TIMEOUT", str(LOCK_TIMEOUT_S))
    try:
        return float(value)
    except ValueError:
        raise KernelCacheError(f"LORAKIT_KERNEL_LOCK_TIMEOUT={value!r} is not a number of seconds") from None


def _wait(is_free, lock: Path, deadline: float, timeout: float) -> None:
    while not is_free():
        if time.monotonic() > deadline:
            raise KernelCacheError(
                f"{lock} is still held after {timeout:g} s. Another lorakit may be compiling the kernel; "
                f"if none is, a build was killed part-way: delete {lock} and start again")
        time.sleep(0.1)


def _try_flock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Hold the build folder: lorakit's own lock (freed by the OS if its holder dies), then torch's `lock`
    file gone, each waited on until LORAKIT_KERNEL_LOCK_TIMEOUT."""
    timeout = _lock_timeout()
    deadline = time.monotonic() + timeout
    ours = build_dir / "lorakit.lock"
    with open(os.open(ours, os.O_RDWR | os.O_CREAT, 0o600)) as handle:
        _wait(lambda: _try_flock(handle), ours, deadline, timeout)
        torch_lock = build_dir / "lock"
        _wait(lambda: not torch_lock.exists(), torch_lock, deadline, timeout)
        yield


@functools.lru_cache(maxsize=1)
def cpu_kernel() -> Optional[object]:
    """The compiled module (its `add_lora_`), or None where it is off or cannot be built (the reason is logged)."""
    if os.environ.get("LORAKIT_CPU_KERNEL", "1") == "0":
        return None
    if sys.platform != "linux":
        log.info("the compiled LoRA kernel is built on Linux only; using batched products")
        return None
    try:
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # the pip package's binary is off PATH when the venv is not activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        build_dir = _trusted_build_dir()
        with _build_lock(build_dir):
            if not any(build_dir.glob("*.so")):
                log.warning("compiling the CPU LoRA kernel for this machine (once, about 20 s) in %s", build_dir)
            module = load(name=f"lorakit_{build_dir.name}", sources=[str(source) for source in SOURCES],
                          build_directory=str(build_dir), extra_cflags=["-O3", "-march=native", "-fopenmp"],
                          extra_ldflags=["-fopenmp"], verbose=False)
        for library in build_dir.glob("*.so"):  # a umask of 002 would leave it group-writable, refused next time
            library.chmod(library.stat().st_mode & ~(stat.S_IWGRP | stat.S_IWOTH))
        return module
    except KernelCacheError as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the reference path
        reason = f"it could not be built ({type(exc).__name__}: {str(exc).strip()[:300]})"
    log.warning("the CPU LoRA kernel is not used: %s. Using batched products instead, which decode mixed-adapter "
                "batches more slowly", reason)
    return None


class SlotLora:
    """One batch's LoRA for the compiled kernel: each row's (slot, weight) pairs, nothing copied.

    rows: per row a slot (-1: no adapter) or its pairs ((slot, weight), ...) for a mixture (`mixture.py`).
    apply(layer, group, x (B, T, in), y (B, T, out)) adds row b's update to y (in place; returns it), for
    every token of the row (prefill) or its one token (decode).
    """

    def __init__(self, slots: "LoraSlots", rows: list[RowLora], rank: int, active: Optional[torch.Tensor] = None):
        """active (B, T) bool: the tokens the adapters act on (None: all); the others get no LoRA work."""
        self.rank, self.active = rank, active
        self.row_slot, self.row_weight = pair_tensors(rows)  # (B, K) each
        self._token_pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._add_lora = cpu_kernel().add_lora_
        self._stacks = [{group: (s.a, s.bt, s.scale, s.part_end) for group, s in per_group.items()}
                        for per_group in slots.stacks]  # valid until the slots change (then a new SlotLora is made)

    def _pairs_per_token(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens not in self._token_pairs:
            slot = self.row_slot.repeat_interleave(tokens, 0)
            if self.active is not None:  # a token left out has no pair: the kernel does nothing for it
                slot = slot.masked_fill(~self.active.reshape(-1, 1).to(slot.device), -1)
            self._token_pairs[tokens] = (slot.contiguous(), self.row_weight.repeat_interleave(tokens, 0).contiguous())
        return self._token_pairs[tokens]

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pairs = self._pairs_per_token(x.shape[1])
        if y.dtype == torch.float32 and x.dtype == torch.float32 and y.is_contiguous() and x.is_contiguous():
            self._add_lora(y, x, *self._stacks[layer][group], *pairs, self.rank)  # decode's case: no copies
            return y
        out = y.float().contiguous()  # the kernel sums in fp32
        self._add_lora(out, x.float().contiguous(), *self._stacks[layer][group], *pairs, self.rank)
        return out.to(y.dtype)
