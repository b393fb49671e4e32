"""Where the registry lives when `--registry` is not given.

`$LORAKIT_REGISTRY` if set, else `$XDG_DATA_HOME/lorakit/registry`, else `~/.local/share/lorakit/registry`
(the XDG base directory rules: a registry is user data, not a cache that may be thrown away).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union


def registry_path(path: Optional[Union[str, Path]] = None) -> Path:
    """`path` when given, else the default registry folder described above."""
    if path:
        return Path(path).expanduser()
    if os.environ.get("LORAKIT_REGISTRY"):
        return Path(os.environ["LORAKIT_REGISTRY"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "lorakit" / "registry"
