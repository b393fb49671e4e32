"""Activated LoRA (aLoRA): the update applies only from an invocation sequence onwards.

With invocation tokens I = (i_1 .. i_k) and a row x_1 .. x_T whose last occurrence of I starts at position
t0, the adapted layer computes

    h_t = W x_t                  for t < t0     (the base, exactly: no LoRA work at all)
    h_t = W x_t + s · B A x_t    for t >= t0

so the keys and values of every token before the invocation are the base model's, and a base model's KV
cache of that prefix stays valid when the adapter takes over. A row without I runs as the base. This is
PEFT's definition (`alora_invocation_tokens`, `calculate_alora_offsets`): the offset of a row is
T - t0, the number of trailing positions the update covers.

The offsets are found from `input_ids` by a forward pre-hook on the model (`track_invocations`), once per
forward call, and read by every adapted layer. In generation with a KV cache, a step that continues a
sequence (past length > 0) covers all its new tokens in the rows whose invocation was found earlier, as
PEFT's generate does. An adapter called with `inputs_embeds` alone has no ids to search: it runs as the base.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from lorakit.core.variants.lora import LoraVariant
from lorakit.errors import AdapterError


def invocation_start(ids: Sequence[int], invocation: Sequence[int]) -> Optional[int]:
    """Index of the start of the last occurrence of `invocation` in `ids`, None if it does not occur."""
    ids, target = list(ids), list(invocation)
    if not target:
        return len(ids)
    first, k = target[0], len(target)
    for start in range(len(ids) - k, -1, -1):
        if ids[start] == first and ids[start:start + k] == target:  # a slice only where the first id matches
            return start
    return None


def invocation_offsets(input_ids: torch.Tensor, invocation: Sequence[int]) -> list[Optional[int]]:
    """Per row of (B, T) ids: T - start of the last invocation (the positions the update covers), or None."""
    width = input_ids.shape[1]
    starts = [invocation_start(row, invocation) for row in input_ids.tolist()]
    return [None if start is None else width - start for start in starts]


class ActivatedLoraVariant(LoraVariant):
    """One per adapter, shared by its layers: `offsets` is set for each forward call by the model's hook."""

    name = "alora"

    def __init__(self, invocation: Sequence[int]) -> None:
        self.invocation = tuple(invocation)
        self.offsets: Optional[list[Optional[int]]] = None
        self.activated: list[bool] = []     # per row: invocation seen in an earlier call of this sequence

    def forward(self, layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        mask = self.positions(x.shape[0], x.shape[1] if x.dim() == 3 else 1, x.device)
        if mask is None:
            return result
        flat_x, flat_result = x.reshape(-1, x.shape[-1]), result.reshape(-1, result.shape[-1])
        rows = mask.reshape(-1).nonzero().squeeze(1)                          # only the covered positions
        update = layer.lora_output(flat_x.index_select(0, rows), name).to(result.dtype)
        return flat_result.index_add(0, rows, update).view_as(result)

    def positions(self, batch: int, width: int, device) -> Optional[torch.Tensor]:
        """(batch, width) bool: where the update applies in this call; None where it applies nowhere."""
        if not self.offsets or len(self.offsets) != batch or all(o is None for o in self.offsets):
            return None
        covered = torch.tensor([0 if o is None else min(o, width) for o in self.offsets], device=device)
        return torch.arange(width, device=device)[None, :] >= (width - covered)[:, None]

    def observe(self, input_ids: Optional[torch.Tensor], continuing: bool) -> None:
        """Set the offsets for a forward call on `input_ids` (None: no ids, base); `continuing`: a decode step
        of sequences whose earlier tokens are in the KV cache."""
        if input_ids is None:
            self.offsets, self.activated = None, []
            return
        found = invocation_offsets(input_ids, self.invocation)
        if continuing and len(self.activated) == len(found):
            found = [input_ids.shape[1] if before else now for before, now in zip(self.activated, found)]
        self.offsets = found
        self.activated = [o is not None for o in found]

    def merge(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        raise AdapterError(f"adapter {name!r} is an activated LoRA (alora_invocation_tokens): it applies only from "
                           "its invocation on, which a merged weight cannot do. Serve it unmerged.")


def track_invocations(model, state) -> None:
    """Give the active aLoRA adapter its offsets on every forward call: a pre-hook on the model and on its
    decoder (training computes the loss from the decoder's hidden states, without the model's forward).
    `state` (the model's AdapterSet: `activated`, `active`, `disabled_depth`) rides on the hooked modules as
    a plain attribute, so a deep copy of the model hooks its own copy of it."""
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    for module in (model, decoder) if isinstance(decoder, torch.nn.Module) and decoder is not model else (model,):
        module.lorakit_invocations = state
        module.register_forward_pre_hook(_observe_invocation, with_kwargs=True)


def _observe_invocation(module, args, kwargs):
    state = module.lorakit_invocations
    variant = state.activated.get(state.active) if state.disabled_depth == 0 else None
    if variant is not None:
        input_ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        continuing = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0
        variant.observe(input_ids if torch.is_tensor(input_ids) and input_ids.dim() == 2 else None, continuing)
    return None
