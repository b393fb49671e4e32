"""`write_folder`: a folder of copied files that appears whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

from lorakit.io.safetensors_file import current_umask, fsync_path


def write_folder(files: Mapping[str, Path], target: Path, file_mode: int = 0o666) -> None:
    """Copy `files` ({name: source}) into a new folder `target`: into a temporary folder beside it (the same
    filesystem), every file and the folder fsynced, then renamed into place. `target` must not exist (or be
    an empty folder). file_mode: the copies' mode, less the umask."""
    incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=target.parent))
    try:
        for name, source in files.items():
            copy = incoming / name
            shutil.copyfile(source, copy)
            os.chmod(copy, file_mode & ~current_umask())
            fsync_path(copy)
        os.chmod(incoming, 0o777 & ~current_umask())  # mkdtemp's 0o700 would hide it from other users
        fsync_path(incoming)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        os.rename(incoming, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
