"""The run's output folder: what it holds, the rules for reusing one, and leaving nothing behind on failure.

A folder that already holds a run (an adapter, checkpoints or a train_config.json) is refused unless the
user asks to `--resume` it or to `--overwrite` it; overwriting removes only the files a run writes. A
folder holding files a run does not write (someone's project, a home folder) is refused unless
`--overwrite`, so a mistyped `--output` never mixes a run into other work.

The folder is made by `OutputFolder.create()` only once the run has been set up (data read, targets
matched, memory checked); if setting up fails, `OutputFolder.undo()` removes what this run created, so a
failed attempt leaves no empty or data-only folder behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lorakit.engine.routing import ROUTING_FILE
from lorakit.errors import TrainError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
RUN_FILES = ADAPTER_FILES + ("train_config.json", "train_report.json", "metrics.jsonl", "curves.png", "README.md",
                             ROUTING_FILE)
RUN_FOLDERS = ("checkpoints", "tensorboard", "data", "mlruns", "wandb")
HARMLESS = (".DS_Store", "Thumbs.db")     # what file browsers leave in any folder


def holds_run(output: Path) -> bool:
    return any((output / name).exists() for name in RUN_FILES + ("checkpoints",))


def foreign_entries(output: Path) -> list[str]:
    """Names in `output` that no lorakit run writes (hidden temporary files of an interrupted write aside)."""
    if not output.is_dir():
        return []
    ours = set(RUN_FILES + RUN_FOLDERS + HARMLESS)
    return sorted(p.name for p in output.iterdir() if p.name not in ours and not p.name.endswith(".tmp"))


class OutputFolder:
    """Checks at construction (nothing written yet), `create()` when set-up succeeded, `undo()` when not."""

    def __init__(self, output: Path, *, resume: bool, overwrite: bool) -> None:
        self.path = Path(output)
        if self.path.exists() and not self.path.is_dir():
            raise TrainError(f"--output {self.path} is a file, not a folder")
        if resume and overwrite:
            raise TrainError("--resume and --overwrite contradict each other: pick one")
        if holds_run(self.path) and not (resume or overwrite):
            raise TrainError(f"{self.path} already holds a training run (adapter or checkpoints); use --resume to "
                             f"go on with it, --overwrite to replace it, or choose another --output")
        foreign = foreign_entries(self.path)
        if foreign and not overwrite:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise TrainError(f"--output {self.path} holds files that are not a lorakit run's ({shown}); choose an "
                             f"empty or new folder, or pass --overwrite to write the run beside them (they are "
                             f"kept)")
        self.overwrite = overwrite
        self.existed = self.path.exists()
        self.before = {p.name for p in self.path.iterdir()} if self.existed else set()

    def create(self) -> None:
        """Make the folder (clearing a replaced run's files with --overwrite)."""
        if self.overwrite:
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
            for name in RUN_FOLDERS:
                if name != "data":             # the example skill's files, rewritten identically
                    shutil.rmtree(self.path / name, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)

    def undo(self) -> None:
        """Remove what this run created: the folder if it made it, else the entries that were not there."""
        if not self.path.is_dir():
            return
        if not self.existed:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for entry in self.path.iterdir():
            if entry.name not in self.before:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
