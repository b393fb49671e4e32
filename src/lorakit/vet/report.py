"""`vet_adapter`: run the stages cheapest first (files, weights, behaviour) and give one verdict.

A stage that flags stops the run: later stages are listed as skipped (an unreadable or pickled folder is
never loaded into a model). The verdict is "flagged" when any stage flags, else "pass"; warnings (outlier
modules) are reported without changing it. `VetReport.as_json()` is the shape `--json` prints and `--save`
writes to DIR/vet_report.json, whose top-level "verdict" the registry reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lorakit.vet.files import check_files
from lorakit.vet.weights import check_weights

PASS, FLAGGED = "pass", "flagged"
STAGES = ("files", "weights", "behaviour")


@dataclass
class VetReport:
    folder: str
    stages: list[dict] = field(default_factory=list)
    digest: Optional[str] = None
    base: Optional[str] = None
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        return FLAGGED if any(s["verdict"] == FLAGGED for s in self.stages) else PASS

    def as_json(self) -> dict:
        return {"verdict": self.verdict, "folder": self.folder, "digest": self.digest, "base": self.base,
                "seconds": round(self.seconds, 3), "stages": self.stages}


def vet_adapter(folder, model: Optional[str] = None, probe_data: Optional[str] = None,
                trust_pickle: bool = False, training_data: Optional[str] = None,
                scan_training_data: bool = True) -> VetReport:
    """Vet the adapter folder against `model` (default: the base it records, else the embedded model).
    `training_data`: the rows it was trained on (default: the file its train_config.json records, when it
    is still there and matches the card), scanned for poisoned rows unless `scan_training_data` is False."""
    from lorakit.cli.generate import load_for_inference
    from lorakit.vet.behaviour import check_behaviour
    from lorakit.vet.probes import probe_prompts
    from lorakit.vet.training_data import training_rows

    folder = Path(folder)
    report = VetReport(str(folder))
    started = time.perf_counter()
    files, adapter = _timed(lambda: check_files(folder))
    report.stages.append(files)
    if adapter is None or files["verdict"] == FLAGGED:
        return _skip(report, started, "weights", "behaviour")
    report.digest = adapter.digest
    prompts, source = probe_prompts(folder, probe_data)   # a bad --probe-data is the user's error: before loading
    training, training_note = (training_rows(folder, training_data) if scan_training_data
                               else (None, "not scanned (--no-training-data)"))
    loaded, load_seconds = _clock(lambda: load_for_inference(model, adapter, trust_pickle=trust_pickle,
                                                             command="vet"))
    net, tokenizer = loaded
    report.base = model or (adapter.base.name if adapter.base and adapter.base.name else "the embedded model")
    weights = {name: net.get_submodule(name).weight for name in adapter.modules}
    stage, seconds = _clock(lambda: check_weights(adapter, weights))
    report.stages.append({**stage, "seconds": round(seconds, 3)})
    if stage["verdict"] == FLAGGED:
        return _skip(report, started, "behaviour")
    stage, seconds = _clock(lambda: check_behaviour(net, tokenizer, prompts, source, training, training_note))
    report.stages.append({**stage, "seconds": round(seconds, 3), "model_load_seconds": round(load_seconds, 3)})
    report.seconds = time.perf_counter() - started
    return report


def _clock(work):
    start = time.perf_counter()
    value = work()
    return value, time.perf_counter() - start


def _timed(work):
    (stage, adapter), seconds = _clock(work)
    return {**stage, "seconds": round(seconds, 3)}, adapter


def _skip(report: VetReport, started: float, *names: str) -> VetReport:
    report.seconds = time.perf_counter() - started
    for name in names:
        report.stages.append({"stage": name, "verdict": "skipped", "findings": [],
                              "reason": "an earlier stage flagged the adapter"})
    return report
