"""The routing signature a training run leaves beside its adapter (engine/routing.py, docs/routing.md).

Computed once training is done, from the training rows' prompts on the base model (the adapter switched
off), so `lorakit serve` can route requests for model "auto" to the adapter without `lorakit route-index`.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.train.config import TrainConfig


def write_routing_signature(model, tokenizer, config: TrainConfig, train_file: Path, output: Path) -> Path:
    """Write output/routing_signature.safetensors for the prompts of `train_file`; returns its path."""
    from lorakit.core import disable_adapters
    from lorakit.data import read_rows
    from lorakit.engine.routing import compute_signature, signature_prompts
    from lorakit.models import EMBEDDED_NAME
    from lorakit.train.setup import data_columns

    prompts = signature_prompts(read_rows(train_file, data_columns(config)), tokenizer)
    training = model.training
    model.eval()
    try:
        with disable_adapters(model):
            signature = compute_signature(model, prompts, base=config.model or EMBEDDED_NAME)
    finally:
        model.train(training)
    return signature.save(output)
