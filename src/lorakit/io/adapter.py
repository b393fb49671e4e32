"""`lorakit.Adapter`: an adapter read and checked once, then passed around as one immutable value.

    adapter = Adapter.read("runs/reverse")        # a PEFT-format folder (or a hub id)
    adapter.digest                                # "sha256:..." of its files: its identity everywhere
    adapter.config                                # the LoraConfig it was saved with
    adapter.modules["model.layers.0.self_attn.q_proj"]   # LoraFactors: A (r, in), B (out, r), scale s
    adapter.base                                  # BaseRecord: the base it was saved from (name, digest), or None
    lorakit.load_adapter(model, adapter)          # core attaches it; the engine writes it into slots
    adapter.save("copy")                          # the same bytes, so the copy has the same digest

This is the one reader of adapter files: `load_adapter`, `lorakit inspect`, the serving engine (and the
registry, vetting and composition built on it) all take an `Adapter`, so an adapter checked here behaves
the same everywhere. Checks run cheapest first, each error naming the file and the key or field:

  1. the folder: adapter_config.json and adapter_model.safetensors, no pickle weights, both under their
     size caps (no byte of weights is read before that);
  2. the config: JSON with no duplicate keys, PEFT's fields, LoraConfig's checks;
  3. the safetensors header alone: the reference parser's layout rules, float dtypes, no key spelled
     twice (with and without `base_model.model.`);
  4. keys and shapes against the config: every tensor is A, B (or DoRA's magnitude) of a module that
     `target_modules` selects and `exclude_modules` does not, or a weight of a `modules_to_save` module;
     every adapted module has both factors; A is (r, ...) and B (..., r, ...) with r from r/rank_pattern;
     each module's scale alpha / r at most MAX_SCALE;
  5. the data, read once: its sha256 (over both files' bytes, as the signature manifests hash them) and
     no NaN/Inf values.

The digest is computed from the very bytes the tensors are parsed from, so the value can never hold
weights other than the ones its digest names. The base model the adapter was saved from (io.base_record)
rides in the weights file's header metadata, which PEFT and vLLM ignore; saving keeps it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional, Union

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from lorakit.core.config import ALL_LINEAR, LoraConfig
from lorakit.core.targets import name_matches
from lorakit.errors import AdapterFileError
from lorakit.io.adapter_config import CONFIG_NAME, config_from_dict, config_to_json, parse_json
from lorakit.io.base_record import BaseRecord, header_metadata
from lorakit.io.safetensors_file import (DTYPE_NAMES, PICKLE_SUFFIXES, SAFETENSORS_DTYPES, checkable, FLOAT_DTYPES, atomic_write_bytes, count_non_finite,
                                         parse_header, read_header_bytes)

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20           # an adapter_config.json is a few hundred bytes
DEFAULT_MAX_ADAPTER_BYTES = 16 << 30  # 16 GiB: a rank-256 adapter of a 70B model on every linear layer
MAX_SCALE = 1e6                       # |alpha / r| of any trained adapter is far below (typically 0.1 to 100)

# suffix in the file -> which factor, and whether it is an embedding's (A (r, vocab), B (dim, r))
LORA_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
}
BASE_WEIGHT_SUFFIX = ".base_layer.weight"  # PEFT saves a targeted embedding's own weight beside its factors


def split_key(key: str) -> tuple[str, Optional[str]]:
    """(module path, "A" | "B" | "magnitude") for a LoRA key; (path, None) for any other key."""
    path = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for suffix, part in LORA_SUFFIXES.items():
        if path.endswith(suffix):
            return path[: -len(suffix)], part
    return path, None


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module: ΔW = scale · B A, with A (r, d_in[, k...]) and B (d_out, r[, 1...]).

    magnitude: DoRA's per-output-row magnitude (d_out,) or None. embedding: the factors are an
    embedding's (A (r, vocab), B (dim, r)), which PEFT keys differently.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    magnitude: Optional[torch.Tensor] = None
    embedding: bool = False

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class Adapter:
    """A checked adapter: config, tensors as the file keys them, per-module factors, source, digest, and
    the base model it was saved from (`base`, None when the file records none, as PEFT's do not).

    Immutable: the tensors are read-only views of what was checked (never write into them; copy first).
    """

    config: LoraConfig
    tensors: Mapping[str, torch.Tensor]
    source: str
    digest: str
    file_bytes: int = 0
    base: Optional[BaseRecord] = None
    modules: Mapping[str, LoraFactors] = field(init=False, repr=False)
    saved_modules: Mapping[str, torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        modules, saved = _group(self.config, self.tensors)
        object.__setattr__(self, "tensors", MappingProxyType(dict(sorted(self.tensors.items()))))
        object.__setattr__(self, "modules", MappingProxyType(modules))
        object.__setattr__(self, "saved_modules", MappingProxyType(saved))

    # --- making one ----------------------------------------------------------------------------------
    @classmethod
    def read(cls, path: Union[str, Path], *, max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
             allow_hub: bool = True) -> "Adapter":
        """Read and check a PEFT-format adapter folder (or, with allow_hub, a hub id `owner/name`)."""
        from lorakit.io.peft_format import resolve_adapter_folder

        folder = resolve_adapter_folder(path, allow_hub=allow_hub)
        config_path, weights_path = folder / CONFIG_NAME, weights_file(folder)
        _check_size(config_path, MAX_CONFIG_BYTES, "an adapter config")
        _check_size(weights_path, max_bytes, "adapter weights; raise the limit (max_bytes / --max-adapter-bytes) "
                    "if the adapter is really this big")
        config_bytes = config_path.read_bytes()
        config = config_from_dict(parse_json(config_bytes, str(config_path)), str(config_path))
        header_bytes = read_header_bytes(weights_path)
        header = parse_header(header_bytes, weights_path.stat().st_size, str(weights_path))
        check_layout(config, header.shapes, str(weights_path))
        base = BaseRecord.from_metadata(header_metadata(header_bytes), str(weights_path))
        data = weights_path.read_bytes()
        if len(data) != header.file_size:
            raise AdapterFileError(f"{weights_path}: the file changed while it was read; read it again")
        tensors = _parse_checked(data, str(weights_path))
        return cls(config, tensors, str(folder), _digest(config_bytes, data), len(data), base)

    @classmethod
    def from_tensors(cls, config: LoraConfig, tensors: Mapping[str, torch.Tensor], source: str = "<memory>",
                     base: Optional[BaseRecord] = None) -> "Adapter":
        """An adapter made in memory (by training or composition); its digest is that of the files it saves as."""
        config_bytes, data = _encode(config, tensors, base)
        check_layout(config, {k: (SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype)), tuple(t.shape))
                              for k, t in tensors.items()}, source)
        return cls(config, _parse_checked(data, source), source, _digest(config_bytes, data), len(data), base)

    def save(self, path: Union[str, Path]) -> Path:
        """Write the adapter as a PEFT folder (atomically); reading it back gives the same digest."""
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise AdapterFileError(f"{folder} exists and is not a folder; an adapter is saved as a folder")
        config_bytes, data = _encode(self.config, self.tensors, self.base)
        atomic_write_bytes(folder / WEIGHTS_NAME, data)
        atomic_write_bytes(folder / CONFIG_NAME, config_bytes)
        return folder

    # --- what it holds -------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """The largest rank of any adapted module."""
        return max((f.rank for f in self.modules.values()), default=0)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def short_digest(self) -> str:
        return self.digest.removeprefix("sha256:")[:12]

    def __repr__(self) -> str:
        return (f"Adapter({self.source!r}, {self.short_digest}, r={self.config.r}, "
                f"{len(self.modules)} modules, {self.num_parameters:,} parameters)")


# --- checks ------------------------------------------------------------------------------------------
def a_few(names: list[str], shown: int = 3) -> str:
    """'a, b, c and 5 more': an error names a few of a folder's entries, never its whole listing."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def weights_file(folder: Path) -> Path:
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        return weights
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterFileError(f"{folder} has {a_few(pickles)} but no {WEIGHTS_NAME}: pickle files are never "
                               "loaded (they can run arbitrary code). Convert it to safetensors in a trusted "
                               "environment, e.g. PEFT's save_pretrained(..., safe_serialization=True).")
    raise AdapterFileError(f"{folder} has no {WEIGHTS_NAME}")


def _check_size(path: Path, limit: int, what: str) -> None:
    """Refuse a file past its cap before a byte of it is read."""
    size = path.stat().st_size
    if size > limit:
        raise AdapterFileError(f"{path}: {size:,} bytes, above the limit of {limit:,} bytes for {what}")


def _is_conv_tail(shape: tuple[int, ...]) -> bool:
    return all(d == 1 for d in shape)


def check_layout(config: LoraConfig, shapes: Mapping[str, tuple[str, tuple[int, ...]]], source: str) -> None:
    """Keys and shapes (from the header alone) against the config; raises naming the first problems."""
    problems: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    other: dict[str, str] = {}  # bare key -> key, for the tensors that are not LoRA factors
    saved = config.modules_to_save or []
    for key, (dtype, shape) in shapes.items():
        module, part = split_key(key)
        if part is None:
            if module in other:
                problems.append(f"{key}: a second tensor for {module} (also {other[module]!r}); a key may be "
                                "spelled once, with or without the base_model.model. prefix")
                continue
            other[module] = key
            if module.endswith(BASE_WEIGHT_SUFFIX) or any(module == m or module.startswith(m + ".")
                                                          or f".{m}." in f".{module}" for m in saved):
                continue  # checked against the model when attached
            problems.append(f"unexpected: {key} (not a LoRA factor, and not a weight of a modules_to_save module)")
            continue
        if (module, part) in seen:
            problems.append(f"{key}: a second tensor for {module} {part} (also {seen[(module, part)]!r}); a key "
                            "may be spelled once, with or without the base_model.model. prefix")
            continue
        if not _targeted(config, module):
            problems.append(f"unexpected: {key} (module {module!r} is not selected by target_modules "
                            f"{config.target_modules!r}" + (" or is excluded)" if config.exclude_modules else ")"))
            continue
        seen[(module, part)] = key
        r = config.rank_for(module)
        if part == "A" and (len(shape) < 2 or shape[0] != r):
            problems.append(f"{key}: shape {shape}, expected {(r, *shape[1:])}: its rank differs from the config's "
                            "r / rank_pattern")
        elif part == "B" and (len(shape) < 2 or shape[1] != r or not _is_conv_tail(shape[2:])):
            expected = "(out_features, " + ", ".join([str(r)] + ["1"] * max(0, len(shape) - 2)) + ")"
            problems.append(f"{key}: shape {shape}, expected {expected}: its rank differs from the config's "
                            "r / rank_pattern, or it is transposed")
        elif part == "magnitude" and not config.use_dora:
            problems.append(f"unexpected: {key} (a DoRA magnitude, but the config does not set use_dora)")
        if dtype not in FLOAT_DTYPES:
            problems.append(f"{key}: dtype {DTYPE_NAMES.get(dtype, dtype)}; adapter weights must be floating point")
    modules = {m for m, _ in seen}
    for module in sorted(modules):
        for part in ("A", "B") + (("magnitude",) if config.use_dora else ()):
            if (module, part) not in seen:
                problems.append(f"missing: {_expected_key(module, part, seen)} (every adapted module needs lora_A "
                                "and lora_B" + (" and, with use_dora, lora_magnitude_vector)" if config.use_dora else ")"))
    a_shapes = {m: shapes[k][1] for (m, p), k in seen.items() if p == "A"}
    for (module, part), key in seen.items():
        if part == "B" and module in a_shapes and len(shapes[key][1]) != len(a_shapes[module]):
            problems.append(f"{key}: {len(shapes[key][1])} dimensions but lora_A has {len(a_shapes[module])}")
    if not modules and not any(split_key(k)[1] is None for k in shapes):
        problems.append("holds no LoRA weights")
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:8])
        more = f"\n  ... {len(problems)} problems in all" if len(problems) > 8 else ""
        raise AdapterFileError(f"{source} does not match the adapter config beside it:\n{shown}{more}")
    for module in sorted(modules):
        scale = config.scaling_for(module)
        if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
            raise AdapterFileError(f"{source}: {module}: scale {scale!r} (the config's lora_alpha / r after "
                                   "alpha_pattern / rank_pattern) is out of any sane range; trained adapters use "
                                   "scales around 0.1 to 100")


def _expected_key(module: str, part: str, seen: Mapping[tuple[str, str], str]) -> str:
    """The key a missing tensor would have, spelled like its module's other tensors."""
    if part == "magnitude":
        return f"{PREFIX}{module}.lora_magnitude_vector"
    sibling = seen.get((module, "B" if part == "A" else "A"), f"{PREFIX}{module}.lora_X.weight")
    other = "B" if part == "A" else "A"
    return sibling.replace(f"lora_embedding_{other}", f"lora_embedding_{part}").replace(f"lora_{other}.", f"lora_{part}.")


def _targeted(config: LoraConfig, module: str) -> bool:
    spec = config.target_modules
    selected = spec is None or spec == ALL_LINEAR or name_matches(spec, module)
    return selected and not name_matches(config.exclude_modules, module)


def _parse_checked(data: bytes, source: str) -> dict[str, torch.Tensor]:
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as exc:  # the reference parser's own checks; any failure means a corrupt file
        raise AdapterFileError(f"{source}: not a valid safetensors file ({exc})") from None
    for key, tensor in tensors.items():
        bad = count_non_finite(tensor)
        if bad:
            raise AdapterFileError(f"{source}: tensor {key!r} holds {bad} NaN/Inf values of {tensor.numel()}; the "
                                   "adapter diverged during training or the file is corrupt")
        scale_problem = _absurd(tensor)
        if scale_problem:
            raise AdapterFileError(f"{source}: tensor {key!r} {scale_problem}")
    return tensors


def _absurd(tensor: torch.Tensor) -> Optional[str]:
    """A factor whose values overflow fp32 once multiplied out is refused before it can reach a forward pass."""
    values = checkable(tensor)
    if values.numel() and values.abs().max().item() > 1e18:
        return "holds values above 1e18; no trained adapter does, and they overflow once multiplied out"
    return None


def _group(config: LoraConfig, tensors: Mapping[str, torch.Tensor]
           ) -> tuple[dict[str, LoraFactors], dict[str, torch.Tensor]]:
    """Per-module factors with their scale, and the other tensors (modules_to_save, base weights)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    embedding: set[str] = set()
    saved = {}
    for key, tensor in tensors.items():
        module, part = split_key(key)
        if part is None:
            saved[module] = tensor
            continue
        parts.setdefault(module, {})[part] = tensor
        if "lora_embedding_" in key:
            embedding.add(module)
    modules = {}
    for module, found in parts.items():
        magnitude = found.get("magnitude")
        modules[module] = LoraFactors(found["A"], found["B"], float(config.scaling_for(module)),
                                      None if magnitude is None else magnitude.reshape(-1), module in embedding)
    return modules, saved


# --- bytes -------------------------------------------------------------------------------------------
def _encode(config: LoraConfig, tensors: Mapping[str, torch.Tensor], base: Optional[BaseRecord]
            ) -> tuple[bytes, bytes]:
    """The two files' bytes; the weights' header metadata is PEFT's {"format": "pt"} plus the base record."""
    clean = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    metadata = {"format": "pt", **(base.to_metadata() if base is not None else {})}
    return config_to_json(config).encode(), _sorted_metadata(save_safetensors_bytes(clean, metadata=metadata))


def _sorted_metadata(data: bytes) -> bytes:
    """The same file with `__metadata__`'s keys in sorted order: safetensors writes them in a Rust hash map's
    order, which changes from process to process, and the digest must not."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    if len(header.get("__metadata__", {})) < 2:
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # tensor data stays 8-byte aligned, as safetensors lays it out
    return len(text).to_bytes(8, "little") + text + data[8 + length:]


def _digest(config_bytes: bytes, weights_bytes: bytes) -> str:
    """sha256 over each file's name and bytes: the adapter's identity."""
    digest = hashlib.sha256()
    for name, data in ((CONFIG_NAME, config_bytes), (WEIGHTS_NAME, weights_bytes)):
        digest.update(name.encode() + b"\0")
        digest.update(data)
    return "sha256:" + digest.hexdigest()

