"""The learning-rate schedule: linear warmup, then cosine, linear or constant.

With w warmup steps and T steps in all, the factor multiplying each group's lr at step t is

    t / max(1, w)                                  for t < w
    cosine:   max(0, ½ (1 + cos(π p)))             p = (t - w) / max(1, T - w)
    linear:   max(0, (T - t) / max(1, T - w))
    constant: 1

the same values as transformers' get_scheduler("cosine" | "linear" | "constant_with_warmup"), which a test
checks. Written here because importing transformers' optimization module pulls in its Trainer and, through
it, PEFT and bitsandbytes (with their import-time warnings) into every run.
"""

from __future__ import annotations

import math
from functools import partial

import torch


def warmup_factor(step: int, *, kind: str, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping `kind` ("cosine", "linear" or "constant") after `warmup` of `total` steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_factor, kind=kind, warmup=warmup, total=total))
