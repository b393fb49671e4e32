"""What a training run reports while it runs: a metrics file, experiment trackers, a progress bar.

`<output>/metrics.jsonl` holds one JSON object per line, one line per logged step:

    {"step": 20, "kind": "train", "loss": 2.31, "lr": 0.0002, "tokens_per_second": 5230.0, "time": 1718000000.1}
    {"step": 50, "kind": "eval", "loss": 1.12, "perplexity": 3.06, "exact_match": 0.42, "time": ...}

`exact_match` is a fraction in [0, 1]. Values that are not finite (a diverged loss) are written as null,
so every line is strict JSON. The same scalars go to the trackers of `report_to` (trackers.py).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from lorakit.train.trackers import DEFAULT, open_trackers

METRICS_FILE = "metrics.jsonl"
KINDS = ("train", "eval")


class MetricsLog:
    """Appends one JSON object per line to <output>/metrics.jsonl, and mirrors the scalars to the trackers
    named in `report_to` (as `<kind>/<name>` at the record's step): "tensorboard" (the default; skipped
    with a note when the package is missing), "wandb", "mlflow", or "none". `run_config` (the run's
    settings) becomes the wandb config and the MLflow run's params.

    resume_step: keep the lines of an existing metrics.jsonl whose "step" <= resume_step (a run resumed
    from that checkpoint repeats the later steps), then append; None starts a fresh file. enabled=False
    (non-zero ranks of a distributed run) makes every method a no-op and touches no file.
    """

    def __init__(self, output_dir, *, enabled: bool = True, resume_step: int | None = None,
                 report_to: Sequence[str] = DEFAULT, run_config: dict | None = None) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._file = None
        self._trackers = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._trackers = open_trackers(report_to, self.path.parent, run_config, resume_step)
        if resume_step is None:
            self._file = self.path.open("w", encoding="utf-8")
        else:
            kept = [r for r in self.records() if isinstance(r.get("step"), (int, float)) and r["step"] <= resume_step]
            _write_lines_atomically(self.path, kept)
            self._file = self.path.open("a", encoding="utf-8")

    def log(self, record: dict) -> None:
        """Write `record` ("step", "kind" in KINDS, scalars) with "time" (unix seconds) added; flushed."""
        if not self.enabled:
            return
        if "step" not in record or record.get("kind") not in KINDS:
            raise ValueError(f"a metrics record needs 'step' and a 'kind' in {KINDS}, got {record!r}")
        line = {**record, "time": time.time()}
        self._file.write(_to_json(line) + "\n")
        self._file.flush()
        scalars = {f"{record['kind']}/{name}": value for name, value in record.items()
                   if name not in ("step", "kind") and isinstance(value, (int, float)) and not isinstance(value, bool)}
        for tracker in self._trackers:
            tracker.log(scalars, record["step"])

    def records(self) -> list[dict]:
        """The records in the file now; a line cut short by a crash is skipped."""
        if not self.enabled or not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


def _to_json(record: dict) -> str:
    """Strict JSON: NaN and ±Inf become null."""
    return json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()},
                      allow_nan=False)


def _write_lines_atomically(path: Path, records: list[dict]) -> None:
    temp = path.with_name(path.name + ".tmp")
    with temp.open("w", encoding="utf-8") as f:
        f.writelines(_to_json(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


class Progress:
    """A progress bar over optimizer steps with the loss, tokens/s and learning rate; the ETA is tqdm's own
    (from the rate of the steps run in this process, so a resumed run's ETA is not skewed by `initial`).
    enabled=False shows nothing and `write` prints nothing (non-zero ranks)."""

    def __init__(self, total_steps: int, *, initial: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                         disable=not enabled)

    def update(self, step: int, loss: float, tokens_per_second: float, lr: float) -> None:
        """Move the bar to `step` (the number of optimizer steps done) and show the step's numbers."""
        if not self.enabled:
            return
        self._bar.set_postfix({"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_second:,.0f}", "lr": f"{lr:.2e}"},
                              refresh=False)
        self._bar.update(step - self._bar.n)

    def write(self, message: str) -> None:
        """Print a line above the bar without breaking it."""
        if self.enabled:
            self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()
