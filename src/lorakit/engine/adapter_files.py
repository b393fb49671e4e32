"""Read a PEFT adapter folder for serving: check it against the base model, keep its factors and scales.

What the engine keeps of an adapter is, for every adapted projection, `A` (r, in) and `B` (out, r) as the
file stores them (fp32, bf16 or fp16) and the scale `s` (alpha / r, or alpha / sqrt(r) with rsLoRA, after
rank_pattern / alpha_pattern). Checks, each with a message naming the file:
LoRA only (no DoRA magnitude, no modules_to_save, no embedding or head adapters), every tensor on a known
projection with the shapes of this model, rank at most the server's limit, no NaN/Inf.

An adapter's identity is the sha256 of its two files' bytes, so a reloaded adapter whose files changed is
a different adapter, never confused with the old one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import AdapterFileError
from lorakit.engine.layout import DecoderLayout
from lorakit.io.adapter_config import CONFIG_NAME, read_config
from lorakit.io.peft_format import resolve_adapter_folder, split_key, weights_file
from lorakit.io.safetensors_file import read_tensors


@dataclass
class AdapterWeights:
    """An adapter ready for the slots: {(layer, projection): (A (r, in), B (out, r), s)}, on the CPU."""

    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]
    rank: int
    content_hash: str
    folder: Path

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in self.factors.values())

    def fits(self, dtype: torch.dtype) -> bool:
        """Whether every factor is exactly a `dtype` value (an adapter saved in bf16 fits bf16 slots losslessly)."""
        return all(t.dtype == dtype or torch.equal(t.to(dtype).to(t.dtype), t)
                   for a, b, _ in self.factors.values() for t in (a, b))


def content_hash(folder: Path) -> str:
    """sha256 over adapter_config.json and the weights file, the identity of an adapter's content."""
    digest = hashlib.sha256()
    for path in (folder / CONFIG_NAME, weights_file(folder)):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def read_adapter(path: str | Path, layout: DecoderLayout, max_rank: int) -> AdapterWeights:
    """Load and check an adapter folder for serving on the model described by `layout`."""
    folder = resolve_adapter_folder(path)
    config = read_config(folder / CONFIG_NAME)
    source = folder / CONFIG_NAME
    if config.use_dora:
        raise AdapterFileError(f"{source}: a DoRA adapter (use_dora) cannot be served unmerged; merge it into the base "
                               "model with `lorakit merge` and serve the merged model")
    if config.modules_to_save:
        raise AdapterFileError(f"{source}: modules_to_save ({', '.join(config.modules_to_save)}) replaces whole "
                               "modules, which the serving engine does not batch; merge the adapter with `lorakit merge`")
    weights = weights_file(folder)
    digest = content_hash(folder)
    tensors = read_tensors(weights)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, part = split_key(key)
        where = layout.parse_module_path(module)
        if part not in ("A", "B") or where is None:
            raise AdapterFileError(f"{weights}: tensor {key!r} is not the LoRA A or B factor of a q/k/v/o/gate/up/down "
                                   f"projection of this {layout.num_layers}-layer model; the serving engine adapts only "
                                   "those (merge other adapters with `lorakit merge`)")
        parts.setdefault(where, {})[part] = tensor
    if not parts:
        raise AdapterFileError(f"{weights}: holds no LoRA weights")
    factors, rank = {}, 0
    for (layer, projection), found in sorted(parts.items()):
        module = layout.module_path(layer, projection)
        if set(found) != {"A", "B"}:
            missing = ({"A", "B"} - set(found)).pop()
            raise AdapterFileError(f"{weights}: {module} has no lora_{missing} tensor")
        a, b = found["A"], found["B"]
        in_features, out_features = layout.in_out(projection)
        r = a.shape[0]
        if a.shape != (r, in_features) or b.shape != (out_features, r):
            raise AdapterFileError(f"{weights}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                                   f"this model's ({out_features}, {in_features}) projection; was the adapter trained "
                                   "for another base model?")
        if r > max_rank:
            raise AdapterFileError(f"{weights}: {module} has rank {r}, above this server's limit of {max_rank}; start "
                                   f"the server with --max-lora-rank {r} or more")
        if r != config.rank_for(module):
            raise AdapterFileError(f"{weights}: {module} has rank {r} but {source} says {config.rank_for(module)} "
                                   "(r / rank_pattern)")
        scale = config.scaling_for(module)
        factors[(layer, projection)] = (a.contiguous(), b.contiguous(), float(scale))
        rank = max(rank, r)
    return AdapterWeights(factors, rank, digest, folder)
