"""The compiled CPU path of the multi-adapter LoRA update (`lora_cpu.cpp`), and its loader.

`SlotLora` reads every row's factors straight from the slots (no gather, no copy), and bf16 or fp16 slots
are widened as they are read, so a batch of 16 distinct adapters reads half the bytes it would in fp32. The
kernel is compiled for this machine (`-O3 -march=native`, OpenMP through PyTorch's own thread pool) the
first time an engine starts on a CPU, about 20 s, and cached under ~/.cache/lorakit/kernels (or
$LORAKIT_CACHE/kernels); later starts load it in milliseconds. Where it cannot be built (no C++ compiler,
no ninja) the engine logs why and uses the batched products of `lora_gathered.py`, the reference path the
kernel is tested against. LORAKIT_CPU_KERNEL=0 turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from lorakit.engine.lora_slots import LoraSlots

log = logging.getLogger("lorakit.engine")
SOURCE = Path(__file__).with_name("lora_cpu.cpp")


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags (a cache shared by several machines stays right)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("LORAKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lorakit")
    return Path(root) / "kernels"


@functools.lru_cache(maxsize=1)
def cpu_kernel() -> Optional[object]:
    """The compiled module (its `add_lora_`), or None where it is off or cannot be built (the reason is logged)."""
    if os.environ.get("LORAKIT_CPU_KERNEL", "1") == "0":
        return None
    if sys.platform != "linux":
        log.info("the compiled LoRA kernel is built on Linux only; using batched products")
        return None
    digest = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), torch.__version__.encode(), sys.version.encode(),
                                        _cpu_signature().encode()])).hexdigest()[:16]
    build_dir = _cache_dir() / f"lora_cpu_{digest}"
    try:
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # the pip package's binary is off PATH when the venv is not activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob("*.so")):
            log.warning("compiling the CPU LoRA kernel for this machine (once, about 20 s) in %s", build_dir)
        return load(name=f"lorakit_lora_cpu_{digest}", sources=[str(SOURCE)], build_directory=str(build_dir),
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the reference path
        log.warning("the CPU LoRA kernel could not be built (%s: %s); using batched products instead, which "
                    "decode mixed-adapter batches more slowly", type(exc).__name__, str(exc).strip()[:300])
        return None


class SlotLora:
    """One batch's LoRA for the compiled kernel: which slot each row uses, nothing copied.

    apply(layer, group, x (B, T, in), y (B, T, out)) adds row b's update to y (in place; returns it), for
    every token of the row (prefill) or its one token (decode).
    """

    def __init__(self, slots: "LoraSlots", row_slots: list[int], rank: int):
        self.rank = rank
        self.row_slot = torch.tensor(row_slots, dtype=torch.long)
        self._token_slot: dict[int, torch.Tensor] = {}
        self._add_lora = cpu_kernel().add_lora_
        self._stacks = [{group: (s.a, s.bt, s.scale, s.part_end) for group, s in per_group.items()}
                        for per_group in slots.stacks]  # valid until the slots change (then a new SlotLora is made)

    def _slot_per_token(self, tokens: int) -> torch.Tensor:
        if tokens not in self._token_slot:
            self._token_slot[tokens] = self.row_slot.repeat_interleave(tokens).contiguous()
        return self._token_slot[tokens]

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = y.contiguous() if y.dtype == torch.float32 else y.float()  # the kernel sums in fp32
        self._add_lora(out, x.float().contiguous(), *self._stacks[layer][group], self._slot_per_token(x.shape[1]),
                       self.rank)
        return out.to(y.dtype)
