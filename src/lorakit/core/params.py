"""Counting what trains: `trainable_parameters(model)` and a one-line report."""

from __future__ import annotations

from torch import nn


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) parameters are counted once."""
    trainable = total = 0
    for param in model.parameters():  # parameters() already skips duplicates of tied weights
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def parameter_report(model: nn.Module) -> str:
    """E.g. 'trainable params: 294,912 || all params: 33,560,064 || trainable%: 0.8788'."""
    trainable, total = trainable_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}"
