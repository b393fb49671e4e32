"""`report_to`: a run's scalars reach TensorBoard, Weights & Biases (offline) and MLflow (a local store),
read back with each tool's own reader; a chosen tracker that is not installed is one line naming the extra."""

from __future__ import annotations

import struct
import sys

import pytest

from lorakit.errors import TrainError
from lorakit.train.config import TrainConfig
from lorakit.train.metrics import MetricsLog

RECORDS = [{"step": 0, "kind": "eval", "loss": 3.5, "exact_match": 0.0},
           {"step": 10, "kind": "train", "loss": 2.0, "lr": 0.001},
           {"step": 20, "kind": "train", "loss": 1.5, "lr": 0.0005},
           {"step": 20, "kind": "eval", "loss": 1.25, "exact_match": 0.5}]


def _log_run(output, **kwargs) -> None:
    metrics = MetricsLog(output, **kwargs)
    for record in RECORDS:
        metrics.log(record)
    metrics.close()


def test_tensorboard_is_the_default_and_holds_every_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_run(tmp_path)  # the call as it was before report_to: TensorBoard by default
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval/exact_match", "eval/loss", "train/loss", "train/lr"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 2.0), (20, 1.5)]
    assert [(e.step, e.value) for e in events.Scalars("eval/exact_match")] == [(0, 0.0), (20, 0.5)]


def test_a_resumed_run_replaces_tensorboard_steps_after_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_run(tmp_path, report_to=["tensorboard"])
    metrics = MetricsLog(tmp_path, report_to=["tensorboard"], resume_step=10)
    metrics.log({"step": 20, "kind": "train", "loss": 1.75, "lr": 0.0005})
    metrics.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 2.0), (20, 1.75)]


def test_mlflow_run_in_the_output_folder_has_params_and_metric_history(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    config = TrainConfig(report_to="mlflow", lr=1e-3, target_modules=["q_proj", "v_proj"])
    _log_run(tmp_path / "run", report_to=config.report_to, run_config=config.to_dict())

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlruns' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.001" and run.data.params["target_modules"] == "['q_proj', 'v_proj']"
    assert len(run.data.params) == len(config.to_dict())
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(10, 2.0),
                                                                                                    (20, 1.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/exact_match")] == [
        (0, 0.0), (20, 0.5)]
    assert not (tmp_path / "mlruns").exists()   # nothing beside the output folder


def test_mlflow_honours_the_tracking_uri_and_experiment_name(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "elsewhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # a file store: quick to set up, where a URI points
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "adapters")
    _log_run(tmp_path / "run", report_to=["mlflow"], run_config={"r": 8})

    client = MlflowClient(tracking_uri=store.as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("adapters").experiment_id])
    assert run.data.params == {"r": "8"} and run.data.metrics["train/loss"] == 1.5
    assert not (tmp_path / "run" / "mlruns").exists()


def test_wandb_offline_run_holds_the_config_and_history(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "lorakit-tests")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = TrainConfig(report_to="wandb", r=4)
    _log_run(tmp_path / "run", report_to=config.report_to, run_config=config.to_dict())
    wandb.teardown()   # what leaving the process does: wait for wandb's service to finish writing the run

    [folder] = (tmp_path / "run" / "wandb").glob("offline-run-*")
    [log_file] = folder.glob("run-*.wandb")
    records = _wandb_records(log_file.read_bytes())
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "lorakit-tests" and run.display_name == "run"
    settings = {item.key: item.value_json for item in run.config.update}
    assert settings["r"] == "4" and settings["report_to"] == '["wandb"]'
    history = [{item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h] == [("10", "2"), ("20", "1.5")]
    assert [(h["_step"], h["eval/exact_match"]) for h in history if "eval/exact_match" in h] == [("0", "0"),
                                                                                                 ("20", "0.5")]


def _wandb_records(data: bytes) -> list:
    """The protobuf records of a .wandb run file: a 7-byte header, then LevelDB-style 32 KiB blocks of
    chunks (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    assert data[:4] == b":W&B"
    records, position, pending = [], 7, b""
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:                      # a block's tail too short for a chunk header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))              # no saved W&B login
    with pytest.raises(TrainError, match=r"^report_to wandb: .*WANDB_MODE=offline keeps the run on disk"):
        MetricsLog(tmp_path / "online", report_to=["wandb"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuch://tracker")
    with pytest.raises(TrainError, match=r"^report_to mlflow: .*unsupported URI 'nosuch://tracker'") as refused:
        MetricsLog(tmp_path / "bad-uri", report_to=["tensorboard", "mlflow"])
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "bad-uri" / "metrics.jsonl").exists()


def test_a_chosen_tracker_that_is_not_installed_names_its_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)          # as if wandb were not installed
    with pytest.raises(TrainError, match=r"^report_to wandb: the wandb package is not installed; "
                                         r"pip install 'lorakit\[wandb\]'$"):
        MetricsLog(tmp_path, report_to=["tensorboard", "wandb"])
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "metrics.jsonl").exists()

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(TrainError, match=r"lorakit\[tensorboard\]"):
        MetricsLog(tmp_path, report_to=["tensorboard", "mlflow"])  # chosen among others: a choice, not the default


def test_the_default_tensorboard_missing_is_a_note_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    _log_run(tmp_path)
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and "tensorboard is not installed" in note and "lorakit[tensorboard]" in note
    assert len(MetricsLog(tmp_path, resume_step=100, report_to=["none"]).records()) == len(RECORDS)
    assert not (tmp_path / "tensorboard").exists()


def test_report_to_flag_takes_comma_separated_trackers(capsys):
    from lorakit.cli import main

    assert main(["train", "--print-config", "--report-to", "wandb,mlflow"]) == 0
    assert '"report_to": [\n    "wandb",\n    "mlflow"\n  ]' in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main(["train", "--print-config", "--report-to", "comet"])
    assert refused.value.code == 2 and "invalid choice: 'comet'" in capsys.readouterr().err
    assert main(["train", "--print-config", "--report-to", "none,wandb"]) == 2
    assert capsys.readouterr().err.startswith("lorakit train: error: report_to takes")
