"""Experiment trackers a run's scalars are mirrored to (`report_to`): TensorBoard, Weights & Biases, MLflow.

Each is a small writer with `log(scalars, step)` and `close()`, its package imported only when it is
chosen. Scalars are named `<kind>/<name>` (`train/loss`, `eval/exact_match`) at the record's step.

    tensorboard   torch.utils.tensorboard event files in <output>/tensorboard
                  (`tensorboard --logdir <output>/tensorboard`)
    wandb         wandb.init(project=$WANDB_PROJECT or "lorakit", dir=<output>, config=the run's settings);
                  WANDB_MODE=offline keeps it on disk (`wandb sync <output>/wandb/offline-run-*` later)
    mlflow        a run in experiment $MLFLOW_EXPERIMENT_NAME or "lorakit", params = the run's settings,
                  at $MLFLOW_TRACKING_URI, or else in <output>/mlruns/mlflow.db (SQLite, the kind of store
                  MLflow itself defaults to; its first use in a folder takes a few seconds to set up):
                  `mlflow ui --backend-store-uri sqlite:///<output>/mlruns/mlflow.db`

A chosen tracker whose package is missing is a TrainError naming the pip extra
(`pip install 'lorakit[wandb]'`), except the default, tensorboard alone: without the package the run
says so in one line and keeps to metrics.jsonl.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from lorakit.errors import TrainError

DEFAULT = ("tensorboard",)


class TensorBoard:
    module = "tensorboard"

    def __init__(self, output: Path, run_config: dict | None, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides the events the first run wrote after its checkpoint
        self._writer = SummaryWriter(log_dir=str(output / "tensorboard"),
                                     purge_step=None if resume_step is None else resume_step + 1)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandB:
    module = "wandb"

    def __init__(self, output: Path, run_config: dict | None, resume_step: int | None) -> None:
        import wandb

        try:
            self._run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "lorakit",
                                   name=output.resolve().name, dir=str(output), config=run_config or {})
        except wandb.errors.Error as exc:  # no account, no network: one line, not wandb's traceback
            raise TrainError(f"report_to wandb: {exc} (WANDB_MODE=offline keeps the run on disk, no account "
                             "needed)") from None

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


class MLflow:
    """Through an MlflowClient of its own: no process-wide active run or tracking URI is set."""

    module = "mlflow"

    def __init__(self, output: Path, run_config: dict | None, resume_step: int | None) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._start(output, run_config)
        except MlflowException as exc:  # a bad URI, a refused store, an unreachable server: one line
            raise TrainError(f"report_to mlflow: {exc.message.strip().splitlines()[0]}") from None

    def _start(self, output: Path, run_config: dict | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri, artifacts = os.environ.get("MLFLOW_TRACKING_URI"), None
        if not uri:  # the run's own store: MLflow's default kind (SQLite), kept in the output folder
            store = (output / "mlruns").resolve()
            store.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()
        self._client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "lorakit"
        experiment = self._client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment
                         else self._client.create_experiment(name, artifact_location=artifacts))
        self.run_id = self._client.create_run(experiment_id, run_name=output.resolve().name).info.run_id
        params = [Param(key, str(value)) for key, value in (run_config or {}).items()]
        for first in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self._client.log_batch(self.run_id, params=params[first:first + 100])

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(name, value, now, step) for name, value in scalars.items()])

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def open_trackers(report_to: Sequence[str], output: Path, run_config: dict | None = None,
                  resume_step: int | None = None) -> list:
    """A started tracker for each name in `report_to` ("none" or [] for none); every package is checked
    before any tracker starts, so a missing one fails the run before it has begun anything."""
    chosen = [name for name in report_to if name != "none"]
    for name in chosen:
        if name not in TRACKERS:
            raise TrainError(f"report_to: unknown tracker {name!r}; the trackers are {', '.join(TRACKERS)}")
    missing = [name for name in chosen if importlib.util.find_spec(TRACKERS[name].module) is None]
    if missing and tuple(chosen) == DEFAULT:
        print("lorakit train: tensorboard is not installed, so metrics go to metrics.jsonl alone "
              "(pip install 'lorakit[tensorboard]' for TensorBoard logs)", file=sys.stderr)
        return []
    if missing:
        raise TrainError(f"report_to {missing[0]}: the {TRACKERS[missing[0]].module} package is not installed; "
                         f"pip install 'lorakit[{missing[0]}]'")
    started = []
    try:
        for name in chosen:
            started.append(TRACKERS[name](Path(output), run_config, resume_step))
    except BaseException:
        for tracker in started:
            tracker.close()
        raise
    return started
