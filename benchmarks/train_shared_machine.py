#!/usr/bin/env python
"""`lorakit train`'s step time alone and beside one busy process, with lorakit's thread choice and with
every core (the behaviour before lorakit chose its threads from the free cores), in one run.

Each case is the README's `lorakit train` (the embedded model, the reverse_words skill, every default)
with a short run: --max-steps (default 30), --logging-steps 1 so that metrics.jsonl times every step,
--eval-samples 0 (the held-out loss alone: generation would only lengthen the run) and --no-progress. A
step's time is its tokens over the tokens/s logged for it (the loop's own timer around the step); the
figure is the median over the steps after the first. The busy process is `python -c "while True: pass"`,
pinned to no core, started before the run and killed after it.

  default     `lorakit train ...`: threads from the free cores (src/lorakit/train/threads.py)
  all cores   `lorakit train ... --threads N`, N = this process's usable cores: torch's count before

The verdict: beside the busy process a default step costs at most 2.5x its time alone. The load average
before and after is printed: other processes on the machine (a test run) count as load in every case.

    python benchmarks/train_shared_machine.py
    python benchmarks/train_shared_machine.py --max-steps 20 --json benchmarks/latest_train_shared_machine.json
    python benchmarks/train_shared_machine.py --env OMP_WAIT_POLICY=PASSIVE   # the runs' environment too
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RATIO_TARGET = 2.5     # a step beside one busy process, over the same step alone (lorakit's default)
BUSY = [sys.executable, "-c", "while True: pass"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-steps", type=int, default=30, help="steps per run (default 30)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for every training run (repeatable)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    return p.parse_args(argv)


def train_command(output: Path, max_steps: int, threads: int | None) -> list[str]:
    command = [sys.executable, "-m", "lorakit", "train", "--max-steps", str(max_steps), "--logging-steps", "1",
               "--eval-samples", "0", "--no-progress", "--output", str(output), "--overwrite"]
    return command + (["--threads", str(threads)] if threads else [])


def step_seconds(output: Path) -> list[float]:
    """Every step's time, from metrics.jsonl (logged every step): its tokens over its tokens/s."""
    seconds, seen = [], 0
    for line in (output / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            seconds.append((record["tokens_seen"] - seen) / record["tokens_per_second"])
            seen = record["tokens_seen"]
    return seconds


def run_case(command: list[str], env: dict, busy: bool) -> dict:
    output = Path(command[command.index("--output") + 1])
    competitor = subprocess.Popen(BUSY) if busy else None
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    steps = step_seconds(output)[1:]
    report = json.loads((output / "train_report.json").read_text())
    return {"median_step_s": statistics.median(steps), "steps_s": [round(s, 4) for s in steps],
            "threads": report.get("threads")}


def main(argv=None) -> int:
    args = parse_args(argv)
    command_line = shlex.join([sys.executable] + (sys.argv if argv is None else ["train_shared_machine.py", *argv]))
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, **dict(item.split("=", 1) for item in args.env)}
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="lorakit-shared-") as scratch:
        for name, threads in (("default", None), ("all cores", cores)):
            command = train_command(Path(scratch) / "run", args.max_steps, threads)
            solo, beside = run_case(command, env, busy=False), run_case(command, env, busy=True)
            results[name] = {"command": shlex.join(command), "solo": solo, "busy": beside,
                             "ratio": beside["median_step_s"] / solo["median_step_s"]}
    load_after = os.getloadavg()

    print(f"command: {command_line}")
    print(f"{cores} usable cores; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    print(f"{'threads':<10} {'alone':>9} {'beside busy':>12} {'ratio':>7}   threads chosen (alone / beside)")
    for name, row in results.items():
        chosen = [_threads_text(row[case]["threads"]) for case in ("solo", "busy")]
        print(f"{name:<10} {row['solo']['median_step_s']:>8.3f}s {row['busy']['median_step_s']:>11.3f}s "
              f"{row['ratio']:>6.2f}x   {chosen[0]} / {chosen[1]}")
    ratio = results["default"]["ratio"]
    verdict = "PASS" if ratio <= RATIO_TARGET else "FAIL"
    print(f"{verdict}: beside one busy process a default step costs {ratio:.2f}x its time alone "
          f"(target <= {RATIO_TARGET}x)")
    if args.json:
        out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command_line,
               "cores": cores, "load_average_before": load_before, "load_average_after": load_after,
               "env": args.env, "max_steps": args.max_steps, "target_ratio": RATIO_TARGET, "results": results,
               "verdict": verdict}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0 if verdict == "PASS" else 1


def _threads_text(threads: dict | None) -> str:
    if not threads:
        return "?"
    counts = [threads["threads"], *(change["threads"] for change in threads["changes"])]
    return "->".join(map(str, counts))


if __name__ == "__main__":
    sys.exit(main())
