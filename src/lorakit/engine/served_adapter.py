"""An `Adapter` fitted to the serving engine's layout: per projection A, B and the scale, checked once.

What the engine keeps of an adapter is, for every adapted projection, `A` (r, in) and `B` (out, r) as the
file stores them (fp32, bf16 or fp16) and the scale `s` (alpha / r, or alpha / sqrt(r) with rsLoRA, after
rank_pattern / alpha_pattern), all taken from the `lorakit.Adapter` value that `io` read and checked.
What serving adds to those checks: LoRA only (no DoRA magnitude, no modules_to_save, no embedding or head
adapters), every module one of the q/k/v/o/gate/up/down projections of this model with its shapes, and a
rank at most the server's limit. An activated LoRA is served like any other; where it applies is the
request's business (`alora.py`). The adapter's identity is its digest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.engine.layout import DecoderLayout
from lorakit.errors import AdapterFileError
from lorakit.io.adapter import Adapter


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter ready for the slots: {(layer, projection): (A (r, in), B (out, r), s)}, on the CPU."""

    adapter: Adapter
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]
    rank: int

    @property
    def digest(self) -> str:
        return self.adapter.digest

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in self.factors.values())

    def fits(self, dtype: torch.dtype) -> bool:
        """Whether every factor is exactly a `dtype` value (an adapter saved in bf16 fits bf16 slots losslessly)."""
        return all(t.dtype == dtype or torch.equal(t.to(dtype).to(t.dtype), t)
                   for a, b, _ in self.factors.values() for t in (a, b))


def fit_to_layout(adapter: Adapter, layout: DecoderLayout, max_rank: int) -> ServedAdapter:
    """Check that the engine can serve `adapter` on the model described by `layout`; its factors by projection."""
    source, config = adapter.source, adapter.config
    if config.use_dora:
        raise AdapterFileError(f"{source}: a DoRA adapter (use_dora) cannot be served unmerged; merge it into the base "
                               "model with `lorakit merge` and serve the merged model")
    if config.modules_to_save or adapter.saved_modules:
        saved = config.modules_to_save or sorted(adapter.saved_modules)
        raise AdapterFileError(f"{source}: modules_to_save ({', '.join(saved)}) replaces whole modules, which the "
                               "serving engine does not batch; merge the adapter with `lorakit merge`")
    factors, rank = {}, 0
    for module, found in sorted(adapter.modules.items()):
        where = layout.parse_module_path(module)
        if where is None or found.embedding:
            raise AdapterFileError(f"{source}: {module} is not a q/k/v/o/gate/up/down projection of this "
                                   f"{layout.num_layers}-layer model; the serving engine adapts only those (merge other "
                                   "adapters with `lorakit merge`)")
        in_features, out_features = layout.in_out(where[1])
        a, b, r = found.a, found.b, found.rank
        if a.shape != (r, in_features) or b.shape != (out_features, r):
            raise AdapterFileError(f"{source}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                                   f"this model's ({out_features}, {in_features}) projection; was the adapter trained "
                                   "for another base model?")
        if r > max_rank:
            raise AdapterFileError(f"{source}: {module} has rank {r}, above this server's limit of {max_rank}; start "
                                   f"the server with --max-lora-rank {r} or more")
        factors[where] = (a, b, found.scale)
        rank = max(rank, r)
    if not factors:
        raise AdapterFileError(f"{source}: holds no LoRA weights")
    return ServedAdapter(adapter, factors, rank)
