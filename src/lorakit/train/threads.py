"""How many threads a training run computes with: the cores this process may use that others leave free.

    threads = round(cores - other), at least 1 and at most torch's own count

cores: the CPUs this process may run on (os.sched_getaffinity). other: how many cores' worth of CPU time the
other processes used on those CPUs over a sample: the busy time of those CPUs in /proc/stat (user, nice,
system, irq, softirq, steal) minus this process's own (os.times: every thread of it), divided by the wall
time. Beside one busy process on a 2-core machine, other is about 1 and the run takes one thread; alone, it
takes both. More threads than free cores is what makes a shared machine slow: every parallel region waits
for its slowest thread, and a thread that shares a core with a busy process runs only in that process's
gaps.

The first sample spans the run's set-up (at least `FIRST_SAMPLE_SECONDS`). During training the count is
checked again after a step once `RECHECK_SECONDS` have passed, from the time spent since the last check
(two small reads, no waiting), and torch.set_num_threads is called when the answer changes.

A user's choice wins and is never changed: `--threads N` (TrainConfig.threads), else OMP_NUM_THREADS (which
`--nproc-per-node` sets to each process's share, and torchrun to 1). Where /proc/stat cannot be read (not
Linux), the count is torch's own. The run's count and its changes go to train_report.json ("threads").

Results depend on the thread count at the level of fp32 rounding (a reduction split another way), so only
a fixed count makes runs, and their resumes, repeat to the bit.

OpenMP's wait policy is left as it is: OMP_WAIT_POLICY=PASSIVE spares a busy neighbour the spinning of
waiting threads, but made a step alone 1.4x slower on 2 cores (docs/training.md).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Optional

import torch

FIRST_SAMPLE_SECONDS = 0.25
RECHECK_SECONDS = 2.0
STAT_FILE = "/proc/stat"
# /proc/stat's per-CPU columns: user nice system idle iowait irq softirq steal (guest time is inside user)
BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


@dataclass(frozen=True)
class CpuReading:
    """Seconds of CPU time spent up to `at` (time.monotonic()): on this process's CPUs by everyone, and by
    this process."""
    busy: float
    own: float
    at: float


def usable_cpus() -> Collection[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return range(os.cpu_count() or 1)


def busy_seconds(proc_stat: str, cpus: Collection[int], ticks_per_second: float) -> Optional[float]:
    """The seconds the CPUs `cpus` have spent busy since boot, summed, from the text of /proc/stat; None
    when it lists none of them (a container whose /proc shows other CPU numbers)."""
    ticks, found = 0, 0
    for line in proc_stat.splitlines():
        name, _, values = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        columns = values.split()
        ticks += sum(int(columns[i]) for i in BUSY_COLUMNS if i < len(columns))
        found += 1
    return ticks / ticks_per_second if found else None


def read_cpu(cpus: Collection[int]) -> Optional[CpuReading]:
    """The CPU time spent now (None where /proc/stat cannot be read)."""
    try:
        with open(STAT_FILE) as handle:
            busy = busy_seconds(handle.read(), cpus, os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None
    own = os.times()
    return None if busy is None else CpuReading(busy, own.user + own.system, time.monotonic())


def other_cores(before: CpuReading, after: CpuReading) -> float:
    """How many cores' worth of CPU time other processes used between two readings."""
    elapsed = after.at - before.at
    if elapsed <= 0:
        return 0.0
    return max(0.0, (after.busy - before.busy) - (after.own - before.own)) / elapsed


def choose_threads(cores: int, other: float, ceiling: int) -> int:
    """The cores left free by `other` busy ones, to the nearest whole core (a core half taken counts as
    free); at least 1, at most `ceiling`."""
    return max(1, min(ceiling, math.floor(cores - other + 0.5)))


class IntraOpThreads:
    """The intra-op thread count of one training run: `with` it around the run (torch's count is restored
    after), and call `recheck(step)` after each step.

    requested: the user's --threads (None: OMP_NUM_THREADS if set, else chosen from the free cores).
    Creating it takes the first reading, so the set-up that follows is the first sample."""

    def __init__(self, requested: Optional[int] = None, *, environ: Mapping[str, str] = os.environ,
                 read: Callable[[Collection[int]], Optional[CpuReading]] = read_cpu,
                 recheck_seconds: float = RECHECK_SECONDS):
        self.cpus = usable_cpus()
        self.requested, self._read, self.recheck_seconds = requested, read, recheck_seconds
        if requested is not None:
            self.chosen_by = "--threads"
        elif environ.get("OMP_NUM_THREADS", "").strip():
            self.chosen_by = "OMP_NUM_THREADS"
        else:
            self.chosen_by = "free cores"
        self._last = read(self.cpus) if self.chosen_by == "free cores" else None
        self.count = self.first = self._restore = torch.get_num_threads()
        self.changes: list[dict] = []          # {"step", "threads", "other_cores"} after the first choice

    @property
    def adapting(self) -> bool:
        return self._last is not None

    def __enter__(self) -> "IntraOpThreads":
        self._restore = self.count = torch.get_num_threads()
        if self.requested is not None:
            self._set(self.requested)
        elif self.adapting:
            waited = time.monotonic() - self._last.at
            if waited < FIRST_SAMPLE_SECONDS:
                time.sleep(FIRST_SAMPLE_SECONDS - waited)
            self._choose(step=None)
        self.first = self.count
        return self

    def __exit__(self, *exc) -> None:
        if self.count != self._restore:
            torch.set_num_threads(self._restore)

    def recheck(self, step: int) -> bool:
        """After a step: choose again if `recheck_seconds` have passed since the last reading; True when the
        count changed."""
        if not self.adapting or time.monotonic() - self._last.at < self.recheck_seconds:
            return False
        return self._choose(step)

    def _choose(self, step: Optional[int]) -> bool:
        now = self._read(self.cpus)
        if now is None:                          # /proc went away: keep the count
            self._last = None
            return False
        other = other_cores(self._last, now)
        self._last = now
        count = choose_threads(len(self.cpus), other, ceiling=self._restore)
        if count == self.count:
            return False
        self._set(count)
        if step is not None:
            self.changes.append({"step": step, "threads": count, "other_cores": round(other, 2)})
        return True

    def _set(self, count: int) -> None:
        torch.set_num_threads(count)
        self.count = count

    def report(self) -> dict:
        """For train_report.json: the first count, how it was chosen, the usable cores, and every change."""
        return {"threads": self.first, "chosen_by": self.chosen_by, "cores": len(self.cpus),
                "changes": self.changes}
