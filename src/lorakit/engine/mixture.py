"""What LoRA a request runs: the base model, one adapter, or an exact mixture of adapters.

A request names one adapter (`"reverse"`) or a mixture (`{"a": 0.7, "b": -0.3}`: adapter name -> weight).
`resolve` turns either into pairs (AdapterInfo, weight): none for the base, one at weight 1 for an adapter.
Once the adapters are resident, each batch row carries the pairs (slot, weight) and its update is

    y_i += Σ_j w_ij s_j (x_i A_j^T) B_j^T

the update of W + Σ_j w_j s_j B_j A_j, exactly: every adapter keeps its own rank and scale s_j (rsLoRA's
alpha / sqrt(r) included), weights may be negative, and nothing is merged or copied. Both LoRA paths
(`lora_kernel.py`, `lora_gathered.py`) compute it for the whole batch at once, rows on one adapter, on
mixtures and on the base alike: a row's pairs are padded to the batch's largest mixture with unused pairs
(slot -1, weight 0), never a loop over adapters. A weight of 1 leaves an adapter's scale exact, so a row
on one adapter gets what it got before mixtures existed.

No composed adapter is built per request (the factors concatenated with the weights folded into B, as
`lorakit.compose` does offline): that would copy every factor of the mixture and take a slot of its own
for as long as the request runs, while the pairs read the resident slots in place, in the kernel as in
the reference path's per-batch gather.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Union

import torch

from lorakit.errors import RequestError

if TYPE_CHECKING:
    from lorakit.engine.adapter_cache import AdapterInfo

MAX_MIXTURE = 8  # adapters one request may mix: each costs a shrink and an expand per projection

AdapterChoice = Union[None, str, Mapping[str, float]]  # base, adapter name, or {adapter name: weight}
RowPairs = tuple[tuple[int, float], ...]               # a batch row's (slot, weight) pairs; () for the base
RowLora = Union[int, RowPairs]                         # an int: one slot at weight 1 (-1: none)


def mixture_problem(weights: Mapping) -> Optional[str]:
    """What is wrong with a mixture {name: weight}, phrased to follow the word "adapters"; None if nothing."""
    if not weights:
        return "is empty: name at least one adapter and its weight"
    if len(weights) > MAX_MIXTURE:
        return f"mixes {len(weights)} adapters; one request may mix at most {MAX_MIXTURE}"
    for name, weight in weights.items():
        if not isinstance(name, str) or not name:
            return f"has the key {name!r}; keys are adapter names"
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight):
            return f"gives {name!r} the weight {weight!r}; weights are finite numbers"
    return None


def resolve(choice: AdapterChoice, lookup: Callable[[str], Optional["AdapterInfo"]]) -> tuple:
    """The pairs (AdapterInfo, weight) a request runs; `lookup(name)` finds a registered adapter (None for
    the base model's name, UnknownModelError for no such model). Raises RequestError for a bad mixture."""
    if choice is None or isinstance(choice, str):
        info = lookup(choice) if choice is not None else None
        return () if info is None else ((info, 1.0),)
    if not isinstance(choice, Mapping):
        raise RequestError(f"adapters must be a mapping of adapter name to weight, got {type(choice).__name__}")
    problem = mixture_problem(choice)
    if problem:
        raise RequestError(f"adapters {problem}")
    pairs = []
    for name, weight in choice.items():
        info = lookup(name)
        if info is None:
            raise RequestError(f"adapters names {name!r}, the base model; a mixture mixes adapters only")
        pairs.append((info, float(weight)))
    return tuple(pairs)


def row_pairs(row: RowLora) -> RowPairs:
    """A row's (slot, weight) pairs: an int s is one slot at weight 1 (-1: none)."""
    if isinstance(row, int):
        return ((row, 1.0),) if row >= 0 else ()
    return tuple((slot, weight) for slot, weight in row if slot >= 0)


def pair_tensors(rows: list[RowLora]) -> tuple[torch.Tensor, torch.Tensor]:
    """slot (N, K) int64 and weight (N, K) fp32 of N rows, K the most pairs of any row (at least 1); the
    unused pairs of shorter rows hold slot -1 and weight 0."""
    pairs = [row_pairs(row) for row in rows]
    k = max([1] + [len(p) for p in pairs])
    slot = torch.tensor([[s for s, _ in p] + [-1] * (k - len(p)) for p in pairs], dtype=torch.long)
    weight = torch.tensor([[w for _, w in p] + [0.0] * (k - len(p)) for p in pairs], dtype=torch.float32)
    return slot.reshape(len(pairs), k), weight.reshape(len(pairs), k)
