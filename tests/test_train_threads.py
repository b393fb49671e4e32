"""`lorakit train`'s thread count: the cores other processes leave free, unless the user chose (threads.py).

The rule is checked on made-up /proc/stat readings; one check reads the real /proc/stat beside a busy
process of its own; one short run checks that --threads reaches the run and its report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from lorakit.train import threads
from lorakit.train.threads import CpuReading, IntraOpThreads, busy_seconds, choose_threads, other_cores


def proc_stat(busy_ticks: list[int], idle_ticks: list[int]) -> str:
    """A /proc/stat with one line per CPU: `busy_ticks[i]` split over user and system, the rest idle."""
    lines = [f"cpu  {sum(busy_ticks)} 0 0 {sum(idle_ticks)} 0 0 0 0 0 0"]
    lines += [f"cpu{i} {busy - busy // 3} 0 {busy // 3} {idle} 7 0 0 0 0 0"
              for i, (busy, idle) in enumerate(zip(busy_ticks, idle_ticks))]
    return "\n".join(lines + ["intr 12345 0 0", "ctxt 999", "procs_running 3"]) + "\n"


def reading(busy_ticks, idle_ticks, own: float, at: float, cpus=(0, 1)) -> CpuReading:
    return CpuReading(busy_seconds(proc_stat(busy_ticks, idle_ticks), set(cpus), 100), own, at)


START = reading([1000, 1000], [5000, 5000], own=3.0, at=50.0)
# one second later (100 ticks a CPU), with this process having used one core's worth
ALONE = reading([1060, 1040], [5040, 5060], own=4.0, at=51.0)         # the CPUs' busy time is all ours
BESIDE_BUSY = reading([1100, 1100], [5000, 5000], own=4.0, at=51.0)   # both CPUs busy, half of it ours


def test_the_busy_time_of_the_cpus_this_process_may_use_is_read_from_proc_stat():
    text = proc_stat([300, 200, 900], [10, 10, 10])
    assert busy_seconds(text, {0, 1}, 100) == pytest.approx(5.0)   # cpu2 is not ours; idle and iowait are not busy
    assert busy_seconds(text, {7}, 100) is None                     # none of our CPUs listed: nothing to go on


def test_a_busy_other_process_leaves_one_thread_and_an_idle_machine_all_cores():
    assert other_cores(START, BESIDE_BUSY) == pytest.approx(1.0)
    assert choose_threads(2, other_cores(START, BESIDE_BUSY), ceiling=2) == 1
    assert other_cores(START, ALONE) == pytest.approx(0.0)
    assert choose_threads(2, other_cores(START, ALONE), ceiling=2) == 2
    assert choose_threads(2, 0.4, ceiling=2) == 2 and choose_threads(2, 0.6, ceiling=2) == 1  # nearest core
    assert choose_threads(2, 2.0, ceiling=2) == 1          # a saturated machine still gets one thread
    assert choose_threads(16, 0.0, ceiling=8) == 8         # never more than torch's own count


class Readings:
    """A `read` for IntraOpThreads that hands out readings in turn."""

    def __init__(self, *readings):
        self.readings = list(readings)

    def __call__(self, cpus):
        return self.readings.pop(0)


@pytest.fixture
def two_cores(monkeypatch):
    """This process may use CPUs 0 and 1, and torch computes with 2 threads; torch's count is put back."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "usable_cpus", lambda: {0, 1})
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_count_follows_the_free_cores_during_the_run_and_comes_back_after(two_cores):
    later = reading([1200, 1200], [5100, 5100], own=6.0, at=53.0)   # 2 s on: the other process is gone
    run_threads = IntraOpThreads(None, environ={}, read=Readings(START, BESIDE_BUSY, later), recheck_seconds=0)
    with run_threads:
        assert torch.get_num_threads() == 1 == run_threads.count
        assert run_threads.recheck(step=7) and torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2
    assert run_threads.report() == {"threads": 1, "chosen_by": "free cores", "cores": 2,
                                    "changes": [{"step": 7, "threads": 2, "other_cores": 0.0}]}


def test_without_proc_stat_the_count_is_torchs_own(two_cores):
    with IntraOpThreads(None, environ={}, read=lambda cpus: None) as run_threads:
        assert torch.get_num_threads() == 2 and not run_threads.recheck(step=1)


@pytest.mark.parametrize("requested, environ, expected, chosen_by", [
    (3, {"OMP_NUM_THREADS": "1"}, 3, "--threads"),      # the flag wins over everything
    (None, {"OMP_NUM_THREADS": "1"}, 2, "OMP_NUM_THREADS"),  # torch already follows it: left as it is
])
def test_the_users_choice_wins_and_is_never_changed(two_cores, requested, environ, expected, chosen_by):
    busy = Readings(START, BESIDE_BUSY, BESIDE_BUSY)
    with IntraOpThreads(requested, environ=environ, read=busy, recheck_seconds=0) as run_threads:
        assert torch.get_num_threads() == expected and not run_threads.recheck(step=1)
        assert torch.get_num_threads() == expected
    assert run_threads.report()["chosen_by"] == chosen_by and len(busy.readings) == 3   # /proc never read


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_a_busy_process_beside_this_one_counts_against_the_free_cores():
    """What the busy child used (its own rusage) shows in the others' share; this process's own time not."""
    cpus = threads.usable_cpus()
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)                                   # past its start-up
        before = threads.read_cpu(cpus)
        child_before = _cpu_seconds(child.pid)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:                # this process keeps a core busy too: not "other"
            sum(range(10_000))
        after = threads.read_cpu(cpus)
        child_used = (_cpu_seconds(child.pid) - child_before) / (after.at - before.at)
    finally:
        child.kill()
        child.wait()
    other = other_cores(before, after)
    assert child_used > 0.2, "the busy child hardly ran: the machine is too loaded to tell"
    assert len(cpus) - other <= len(cpus) - child_used + 0.15     # the free cores drop by what the child took


def _cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid`, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_threads_flag_reaches_the_run_its_metrics_and_its_report(model_folder, skill_files, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "--model", model_folder, "--data",
                           skill_files["train"], "--eval-data", skill_files["heldout"], "--output", out,
                           "--max-steps", "2", "--logging-steps", "1", "--eval-samples", "0", "--max-length", "64",
                           "--no-progress", "--report-to", "none", "--threads", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "train_report.json").read_text())
    assert report["threads"] == {"threads": 1, "chosen_by": "--threads", "cores": len(threads.usable_cpus()),
                                 "changes": []}
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["threads"] for r in steps if r["kind"] == "train"] == [1, 1]
    assert json.loads((out / "train_config.json").read_text())["threads"] == 1
