"""The base model an adapter belongs to: recorded when it is saved, checked before it is merged.

An adapter is only meaningful on the base it was trained on, and a path does not survive a move, so
`save_adapter` records the base by name *and* by its weights, in the header of
`adapter_model.safetensors` (`__metadata__["lorakit.base"]`, one JSON string). The header, not
`adapter_config.json`: PEFT warns about config keys it does not know (and lorakit's own reader refuses
them), while PEFT and vLLM read only the tensors of the weights file.

    name     the hub id; a local folder's path as it was given; "lorakit-embedded" for the embedded
             model (never its site-packages path); null for a model built in memory
    source   "hub" | "local" | "embedded" | "memory"
    digest   "sha256:..." over the adapted modules' base weights, in module-name order: each module's
             name, its rows-view shape (outputs x inputs) and 16 evenly spaced rows of it in fp32.
             A sample, so that it is cheap: a 7B Llama with every linear layer adapted hashes 73 MB
             (about a second on a slow CPU) where all its 28 GB in fp32 would take over a minute at
             every save (sha256 at 0.4 GB/s). Fine-tuning or merging changes every row, so a changed base never passes; the same
             weights at another path, or loaded in bf16/fp16/fp32 from the same file, give one digest.
             Null when the weights in memory are not the base's (an adapter merged in, or PiSSA's
             residual).
    probe    per module, 8 base weight values at fixed (row, column) positions in fp32: what
             "this model minus the adapter's update is the recorded base" is checked against.

`compare_base` says what a model is to an adapter's record: "same" (the digest matches), "rounded" (the
probes match within the rounding of the model's precision: the same base stored as bf16, say), "merged"
(model − s·BA matches the probes while the model itself does not: the adapter is already in its
weights), "different", or "unknown" (no record: a PEFT-made adapter). `check_base` turns "merged" into
an error, since merging again would apply the adapter twice.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from lorakit.core.adapters import adapter_layers
from lorakit.core.layers import LoraLayer
from lorakit.errors import AdapterError, AdapterFileError

METADATA_KEY = "lorakit.base"
SAMPLED_ROWS = 16  # rows of each adapted weight the digest covers
PROBES = 8         # weight values recorded per module for the merged-already check
SOURCES = ("hub", "local", "embedded", "memory")


@dataclass(frozen=True)
class BaseRecord:
    """The base model an adapter was saved from: name, where the name points, digest and probe values."""

    name: Optional[str]
    source: str
    digest: Optional[str]
    probe: Mapping[str, tuple[tuple[int, int, float], ...]] = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        """e.g. "lorakit-embedded (sha256:3f2a9c01b7de)", for one-line messages."""
        name = self.name or "an unnamed model built in memory"
        return f"{name} ({self.digest[:19]})" if self.digest else name

    def to_metadata(self) -> dict[str, str]:
        probe = {module: [[i, j, float(f"{v:.9g}")] for i, j, v in points] for module, points in self.probe.items()}
        data = {"name": self.name, "source": self.source, "digest": self.digest, "probe": probe}
        return {METADATA_KEY: json.dumps(data, sort_keys=True, separators=(",", ":"))}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: str) -> Optional["BaseRecord"]:
        """The record in a weights file's `__metadata__`, None if it has none; malformed: AdapterFileError."""
        text = metadata.get(METADATA_KEY)
        if text is None:
            return None
        try:
            data = json.loads(text)
            name, where, digest, probe = data["name"], data["source"], data["digest"], data["probe"]
            valid = (isinstance(name, (str, type(None))) and where in SOURCES and isinstance(probe, dict)
                     and (digest is None or (isinstance(digest, str) and digest.startswith("sha256:"))))
            points = {module: tuple((int(i), int(j), float(v)) for i, j, v in values)
                      for module, values in probe.items()} if valid else {}
            valid = valid and all(i >= 0 and j >= 0 and math.isfinite(v) for p in points.values() for i, j, v in p)
        except (ValueError, TypeError, KeyError, RecursionError):
            valid = False
        if not valid:
            raise AdapterFileError(f"{source}: the recorded base model ({METADATA_KEY} in the header's __metadata__) "
                                   "is malformed; the file is corrupt or was edited")
        return cls(name, where, digest, points)


def header_metadata(header_bytes: bytes) -> dict[str, str]:
    """`__metadata__` of a safetensors header already checked by `safetensors_file.parse_header`."""
    return json.loads(header_bytes[8:]).get("__metadata__", {})


# --- recording ---------------------------------------------------------------------------------------
def record_base(model: nn.Module, name: str) -> BaseRecord:
    """What adapter `name` of `model` was saved on: the base's name and a digest and probe of its weights."""
    base_name, source = base_identity(model)
    layers = _adapted(model, name)
    if not layers or any(layer.merged_adapters or name in layer.pissa_initial for _, layer in layers):
        return BaseRecord(base_name, source, None)  # the weights in memory are not the base's
    probe = {}
    for module, layer in layers:
        rows = _rows(layer)
        i, j = _positions(rows.shape)
        probe[module] = tuple(zip(i.tolist(), j.tolist(), rows[i, j].float().tolist()))
    return BaseRecord(base_name, source, weights_digest(layers), probe)


def base_identity(model: nn.Module) -> tuple[Optional[str], str]:
    """(name, source) of the model's weights, from the name transformers loaded it by."""
    from lorakit.models.loading import EMBEDDED_MODEL, EMBEDDED_NAME, HUB_ID

    given = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if given is None:
        return None, "memory"
    path = Path(given).expanduser()
    if given == EMBEDDED_NAME or (path.is_dir() and path.resolve() == EMBEDDED_MODEL):
        return EMBEDDED_NAME, "embedded"
    if HUB_ID.fullmatch(given) and not path.exists():
        return given, "hub"
    return given, "local"


def weights_digest(layers: list[tuple[str, LoraLayer]]) -> str:
    """sha256 over each module's name, rows-view shape and SAMPLED_ROWS evenly spaced rows in fp32."""
    digest = hashlib.sha256()
    for module, layer in layers:
        rows = _rows(layer)
        count = min(rows.shape[0], SAMPLED_ROWS)
        picked = torch.linspace(0, rows.shape[0] - 1, count).round().long().unique()
        digest.update(f"{module}\0{tuple(rows.shape)}\0".encode())
        digest.update(rows[picked.to(rows.device)].float().cpu().contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _adapted(model: nn.Module, name: str) -> list[tuple[str, LoraLayer]]:
    return sorted(((m, layer) for m, layer in adapter_layers(model) if name in layer.adapter_names),
                  key=lambda item: item[0])


def _rows(layer: LoraLayer) -> torch.Tensor:
    """The base weight as (outputs, inputs): the view every layer kind's update is a plain product in."""
    return layer.to_rows(layer.weight.detach())


def _positions(shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """PROBES (row, column) positions spread over the matrix: evenly spaced rows, columns permuted."""
    rows, cols = shape
    k = torch.arange(PROBES)
    spread = lambda index, n: (index * (n - 1) + (PROBES - 1) // 2) // (PROBES - 1)  # noqa: E731
    return spread(k, rows), spread((3 * k + 1) % PROBES, cols)


# --- checking ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseMatch:
    """What a model is to an adapter's recorded base: same | rounded | merged | different | unknown."""

    status: str
    record: Optional[BaseRecord]

    @property
    def warning(self) -> Optional[str]:
        """One line for a model that is not the recorded base, None otherwise."""
        if self.status != "different":
            return None
        return (f"the model is not the base this adapter was saved from, {self.record.describe()}; its outputs "
                "may not be what it was trained to give")


def compare_base(model: nn.Module, name: str, record: Optional[BaseRecord]) -> BaseMatch:
    """Compare adapter `name`'s recorded base with the base weights under it in `model` (attached, not merged)."""
    layers = _adapted(model, name)
    if record is None or record.digest is None or not layers:
        return BaseMatch("unknown", record)
    if weights_digest(layers) == record.digest:
        return BaseMatch("same", record)
    if set(record.probe) != {module for module, _ in layers}:
        return BaseMatch("different", record)
    current, base, delta, tolerance = [], [], [], []
    for module, layer in layers:
        rows, points = _rows(layer), record.probe[module]
        i, j = torch.tensor([p[0] for p in points]), torch.tensor([p[1] for p in points])
        if int(i.max()) >= rows.shape[0] or int(j.max()) >= rows.shape[1]:
            return BaseMatch("different", record)
        b_rows, a_rows = layer.factor_rows(name)
        terms = b_rows.detach()[i].double().cpu() * a_rows.detach()[:, j].T.double().cpu()  # (PROBES, r)
        scale = layer.scaling[name]
        additive = name not in layer.lora_magnitude_vector  # DoRA rescales: not W + ΔW
        current.append(rows[i, j].double().cpu())
        base.append(torch.tensor([p[2] for p in points], dtype=torch.float32).double())  # exact fp32
        delta.append(scale * terms.sum(1) if additive else torch.full((len(points),), math.nan, dtype=torch.float64))
        # fp32 rounding of the merge's own product (r terms) and of W + ΔW
        tolerance.append(2.0 ** -23 * ((terms.shape[1] + 2) * abs(scale) * terms.abs().sum(1) + base[-1].abs()))
    current, base, delta, tolerance = map(torch.cat, (current, base, delta, tolerance))
    tolerance = tolerance + _unit_roundoff(current) * current.abs()
    if bool(((current - base).abs() <= tolerance).all()):
        return BaseMatch("rounded", record)
    if bool(((current - delta - base).abs() <= tolerance).all()):
        return BaseMatch("merged", record)
    return BaseMatch("different", record)


def _unit_roundoff(values: torch.Tensor) -> float:
    """Half an ulp, relative, of the narrowest precision that holds every value exactly: a model stored in
    bf16 and loaded as fp32 still carries bf16's rounding."""
    for dtype, roundoff in ((torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)):
        if torch.equal(values.to(dtype).double(), values):
            return roundoff
    return 2.0 ** -24


def check_base(model: nn.Module, name: str, record: Optional[BaseRecord], adapter: str, *,
               force: bool = False) -> BaseMatch:
    """Refuse (AdapterError) a model that already holds adapter `name` merged, unless `force`; otherwise
    return the match, whose `.warning` is the one line to show when the model is another base.

    adapter: how to name the adapter in the message (its folder).
    """
    match = compare_base(model, name, record)
    if match.status == "merged" and not force:
        raise AdapterError(f"this model already contains the adapter {adapter} (merged); merging again would apply "
                           "it twice (--force, or force=True, applies it anyway)")
    return match
