"""The run's output folder: what it holds, and the rules for reusing one.

A folder that already holds a run (an adapter, checkpoints or a train_config.json) is refused unless the
user asks to `--resume` it or to `--overwrite` it; overwriting removes only the files a run writes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lorakit.errors import TrainError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
RUN_FILES = ADAPTER_FILES + ("train_config.json", "train_report.json", "metrics.jsonl", "curves.png", "README.md")
RUN_FOLDERS = ("checkpoints", "tensorboard")


def holds_run(output: Path) -> bool:
    return any((output / name).exists() for name in RUN_FILES + RUN_FOLDERS)


def prepare_output(output: Path, *, resume: bool, overwrite: bool) -> None:
    """Create the folder, or check that reusing it is what the user asked for."""
    if output.exists() and not output.is_dir():
        raise TrainError(f"--output {output} is a file, not a folder")
    if resume and overwrite:
        raise TrainError("--resume and --overwrite contradict each other: pick one")
    if holds_run(output) and not (resume or overwrite):
        raise TrainError(f"{output} already holds a training run (adapter or checkpoints); use --resume to go "
                         f"on with it, --overwrite to replace it, or choose another --output")
    if overwrite:
        for name in RUN_FILES:
            (output / name).unlink(missing_ok=True)
        for name in RUN_FOLDERS:
            shutil.rmtree(output / name, ignore_errors=True)
    output.mkdir(parents=True, exist_ok=True)
