"""Collate rows of examples (one, or several packed) into padded tensors the model and the loss read.

A row holds whole examples back to back, then right padding up to the batch's longest row. Packed samples
must not see each other, and real tokens must not see padding. That takes two things:
  position_ids    restart at 0 for each sample (and for the padding), so rotary/absolute positions match
                  the sample run alone;
  attention_mask  a 4-D additive mask (B, 1, T, T): 0 where query t may attend key s (same sample, s ≤ t),
                  float32 min elsewhere.
Why a 4-D mask and not transformers' own packing detection (restarting position_ids with no mask):
that detection is skipped whenever a KV cache exists, and LlamaForCausalLM creates one by default
(use_cache=True, even in train mode), or whenever a 2-D mask is passed, so it silently lets packed samples
attend to each other. A 4-D mask is used as given by both sdpa and eager attention, with or without a
cache, on a bare or a PEFT-wrapped model. It must be additive, not boolean: eager attention adds the mask
to the scores, so a boolean mask would be wrong there. The padding is its own "sample", so every query
attends at least to itself and no softmax row is empty.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from lorakit.data.formatting import IGNORE, Example


@dataclass
class Batch:
    """Model inputs and loss labels for B rows of T tokens."""
    input_ids: torch.Tensor                  # (B, T) long
    labels: torch.Tensor                     # (B, T) long, -100 = no loss; unshifted: labels[:, t] is token t
    position_ids: torch.Tensor               # (B, T) long, restarting at 0 for each packed sample
    attention_mask: Optional[torch.Tensor]   # (B, 1, T, T) float32 additive: 0 = may attend, min = may not
    label_tokens: int                        # positions that carry loss after the shift: (labels[:, 1:] != -100)
    tokens: int = 0                          # real (non-padding) tokens, for throughput figures

    def to(self, device: torch.device) -> "Batch":
        """The batch with its tensors on `device` (itself when they are there already)."""
        if self.input_ids.device == device:
            return self
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: v.to(device) for k, v in tensors.items() if torch.is_tensor(v)})


def collate_rows(rows: list[list[Example]], pad_id: int, multiple_of: int = 1) -> Batch:
    """One Batch from rows of examples; each row's examples are laid end to end, then right-padded.

    The width is the longest row rounded up to `multiple_of`: few distinct shapes matter on CPUs whose bf16
    matmuls (oneDNN) build a kernel for every new shape, at a cost of many steps' worth of time.
    """
    longest = max(sum(len(example.input_ids) for example in row) for row in rows)
    width = -(-longest // multiple_of) * multiple_of
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    sample = torch.zeros((len(rows), width), dtype=torch.long)   # which sample each position belongs to
    for b, row in enumerate(rows):
        start = 0
        for s, example in enumerate(row):
            end = start + len(example.input_ids)
            input_ids[b, start:end] = torch.tensor(example.input_ids)
            labels[b, start:end] = torch.tensor(example.labels)
            position_ids[b, start:end] = torch.arange(end - start)
            sample[b, start:end] = s
            start = end
        position_ids[b, start:] = torch.arange(width - start)                 # padding: a sample of its own
        sample[b, start:] = len(row)
    tokens = sum(len(example.input_ids) for row in rows for example in row)
    if all(len(row) == 1 for row in rows) and tokens == len(rows) * width:
        # One sample per row and no padding: plain causal attention is exact, and lets attention kernels
        # skip reading a (B, 1, T, T) mask.
        return Batch(input_ids, labels, position_ids, None, int((labels[:, 1:] != IGNORE).sum()), tokens)
    causal = torch.ones(width, width, dtype=torch.bool).tril()                # (T, T) key s ≤ query t
    allowed = (sample[:, :, None] == sample[:, None, :]) & causal             # (B, T, T)
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return Batch(input_ids, labels, position_ids, mask[:, None], int((labels[:, 1:] != IGNORE).sum()), tokens)
