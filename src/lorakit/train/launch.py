"""`lorakit train --nproc-per-node N`: start N training processes on this machine through torchrun.

The same as `torchrun --standalone --nproc-per-node N -m lorakit train ...`: torch.distributed.run runs here
as the processes' agent. Each CPU process gets an equal share of this machine's cores (OMP_NUM_THREADS, unless
set). When a process fails, torchrun stops the others and this reports the failing process's own message,
which it left in torchrun's error file (distributed.write_error_file).
"""

from __future__ import annotations

import logging
import os

from lorakit.errors import TrainError


def launch(nproc_per_node: int, argv: list[str]) -> int:
    """Run `lorakit <argv>` on `nproc_per_node` processes; 0 when every one succeeded, else a TrainError."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc_per_node < 1:
        raise TrainError(f"--nproc-per-node must be at least 1; got {nproc_per_node}")
    if "LOCAL_RANK" in os.environ:
        raise TrainError("--nproc-per-node starts torchrun itself; under torchrun, leave it out")
    import torch

    if torch.cuda.is_available() and nproc_per_node > torch.cuda.device_count():
        raise TrainError(f"--nproc-per-node {nproc_per_node}: this machine has {torch.cuda.device_count()} GPU(s), "
                         "and each process takes one")
    # The agent's own log lines (a warning per start, an error per failed process) would bury the one line
    # this reports.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc_per_node)))
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc_per_node}", "-m", "lorakit",
                                         *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        raise TrainError(_cause(exc)) from None
    return 0


def _cause(exc) -> str:
    """The failing process's message: the earliest one read from an error file, else how it ended."""
    reported = [(failure.timestamp, rank, failure) for rank, failure in exc.failures.items()
                if isinstance(failure.message, str) and failure.error_file_data.get("message")]
    if reported:
        return min(reported, key=lambda item: item[:2])[2].message
    rank, failure = exc.get_first_failure()
    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit status {failure.exitcode}"
    return f"process {rank} stopped ({how}) without a message; its output above says why"
