"""Stage 1 of `lorakit vet`: the folder's files, before any model is loaded.

Flags: anything `Adapter.read` refuses (layout, config, header, keys/shapes/ranks, NaN/Inf, size caps); a
pickle anywhere in the folder (by suffix, by the pickle protocol's magic bytes b"\\x80\\x02".."\\x80\\x05",
or a zip archive (torch.save's format) holding a *.pkl member), since unpickling runs code; a per-module
scale s = alpha / r (or alpha / sqrt(r), rsLoRA) outside SCALE_RANGE; a factor entry with |x| above
MAX_FACTOR_ABS (trained LoRA factors are O(1/sqrt(d)); a huge entry is a hand-made weight).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

from lorakit.errors import AdapterFileError, LorakitError
from lorakit.io.adapter import Adapter, a_few
from lorakit.io.safetensors_file import PICKLE_SUFFIXES

SCALE_RANGE = (1e-3, 1e3)       # |alpha / r| of trained adapters: typically 0.1 to 100
MAX_FACTOR_ABS = 1e3            # the largest |entry| of any A or B
MAX_FOLDER_FILES = 1000         # an adapter folder holds a handful of files
PICKLE_MAGIC = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))


def is_pickle(path: Path) -> bool:
    """A pickle by suffix, by its first two bytes, or a zip archive with a pickle inside (torch.save)."""
    if path.suffix in PICKLE_SUFFIXES or path.suffix == ".pickle":
        return True
    with path.open("rb") as handle:
        head = handle.read(4)
    if head[:2] in PICKLE_MAGIC:
        return True
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith(".pkl") for name in archive.namelist())
        except zipfile.BadZipFile:
            return False
    return False


def check_files(folder: Path) -> tuple[dict, Optional[Adapter]]:
    """(the stage's report, the checked Adapter or None when it cannot be read)."""
    if not folder.is_dir():
        raise LorakitError(f"{folder}: not a folder; `lorakit vet` takes an adapter folder")
    files = [p for p in folder.rglob("*") if p.is_file()]
    if len(files) > MAX_FOLDER_FILES:
        return _stage([f"{len(files):,} files in the folder (an adapter holds a handful)"], {}), None
    findings = []
    pickles = sorted(str(p.relative_to(folder)) for p in files if is_pickle(p))
    if pickles:
        findings.append(f"pickle file(s): {a_few(pickles)}; unpickling runs arbitrary code, so lorakit never loads one")
    facts = {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}
    try:
        adapter = Adapter.read(folder, allow_hub=False)
    except AdapterFileError as exc:
        return _stage(findings + [f"unreadable adapter: {exc}"], facts), None
    facts.update(digest=adapter.digest, adapted_modules=len(adapter.modules), rank=adapter.rank,
                 parameters=adapter.num_parameters)
    scales = {name: f.scale for name, f in adapter.modules.items()}
    odd = [n for n, s in scales.items() if not SCALE_RANGE[0] <= abs(s) <= SCALE_RANGE[1]]
    if odd:
        findings.append(f"scale alpha/r outside {SCALE_RANGE[0]:g}..{SCALE_RANGE[1]:g} in {a_few(odd)} "
                        f"(e.g. {scales[odd[0]]:g})")
    largest = {n: max(float(f.a.abs().max()), float(f.b.abs().max())) for n, f in adapter.modules.items()}
    big = [n for n, v in largest.items() if v > MAX_FACTOR_ABS]
    if big:
        findings.append(f"factor entries above {MAX_FACTOR_ABS:g} in {a_few(big)} (e.g. {largest[big[0]]:.3g})")
    facts["max_scale"] = max(map(abs, scales.values()), default=0.0)
    facts["max_factor_abs"] = max(largest.values(), default=0.0)
    return _stage(findings, facts), adapter


def _stage(findings: list[str], facts: dict) -> dict:
    return {"stage": "files", "verdict": "flagged" if findings else "pass", "findings": findings, **facts}
