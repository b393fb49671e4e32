"""Quantize a model's frozen linear layers in place, measure what that saved, and undo it for export.

Every `nn.Linear` except the output head becomes a `QuantizedLinear` (as in QLoRA: embeddings, norms and
the head stay in 16 bits). `backend="auto"` uses bitsandbytes where it runs on the model's device and the
torch path elsewhere; asking for bitsandbytes where it cannot run is an error that names the alternative.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core.adapters import set_submodule
from lorakit.core.targets import output_head_names
from lorakit.errors import ConfigError
from lorakit.quant import bitsandbytes_backend
from lorakit.quant.linear import BACKENDS, METHODS, QuantizedLinear


@dataclass
class QuantizationReport:
    """What quantize_model did: layers replaced, and their weight bytes before (at 16 bits) and after."""

    method: str
    backend: str
    layers: int
    quantized_params: int
    bf16_bytes: int         # those layers' weights at 2 bytes a parameter
    quantized_bytes: int    # the same weights quantized, scales included
    model_bf16_bytes: int   # every parameter of the model at 2 bytes
    model_bytes: int        # the model as stored now: quantized layers + everything else at 16 bits

    @property
    def layer_ratio(self) -> float:
        return self.quantized_bytes / max(1, self.bf16_bytes)

    @property
    def model_ratio(self) -> float:
        return self.model_bytes / max(1, self.model_bf16_bytes)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", *BACKENDS):
        raise ConfigError(f"quantization backend must be auto, torch or bitsandbytes, got {backend!r}")
    reason = bitsandbytes_backend.unavailable_reason(device.type) if backend != "torch" else None
    if backend == "bitsandbytes" and reason:
        raise ConfigError(f"bitsandbytes cannot quantize on {device.type} here ({reason}); use the torch backend "
                          "(--quantize-backend torch), which computes the same weights")
    if backend == "auto":
        return "torch" if reason else "bitsandbytes"
    return backend


def quantize_model(model: nn.Module, method: str, backend: str = "auto", embeddings: bool = False
                   ) -> QuantizationReport:
    """Replace the model's linear layers (not the output head) with QuantizedLinear, in place; with
    `embeddings`, the input embedding table and the output head too (a tied head shares the table's copy)."""
    if method not in METHODS:
        raise ConfigError(f"quantize must be one of {', '.join(METHODS)}, got {method!r}")
    device = next(model.parameters()).device
    backend = resolve_backend(backend, device)
    heads = output_head_names(model)
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and name not in heads]
    if not targets:
        raise ConfigError("the model has no linear layers to quantize")
    model_bf16_bytes = 2 * sum(p.numel() for p in _unique_parameters(model))
    params = bf16_bytes = quantized_bytes = 0
    for name, linear in targets:
        layer = QuantizedLinear(linear, method, backend)
        set_submodule(model, name, layer)
        params += linear.weight.numel()
        bf16_bytes += 2 * linear.weight.numel()
        quantized_bytes += layer.quantized.num_bytes
    layers = len(targets)
    if embeddings:
        for weight_count, weight_bytes in _quantize_embedding_and_head(model, method, backend):
            params, bf16_bytes, quantized_bytes = params + weight_count, bf16_bytes + 2 * weight_count, \
                quantized_bytes + weight_bytes
            layers += 1
    targets.clear()  # the last references to the 16-bit layers: freed now, then handed back to the OS
    _return_freed_memory()
    rest = 2 * sum(p.numel() for p in _unique_parameters(model))  # what is left as parameters: 16 bits each
    return QuantizationReport(method, backend, layers, params, bf16_bytes, quantized_bytes,
                              model_bf16_bytes, quantized_bytes + rest)


def _quantize_embedding_and_head(model: nn.Module, method: str, backend: str):
    """Quantize the input embedding and the output head in place; yields (weights, bytes) of each new copy."""
    from lorakit.quant.embedding import QuantizedEmbedding, tied_head

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise ConfigError(f"quantizing embeddings needs an nn.Embedding input layer; this model has "
                          f"{type(embedding).__name__}")
    tied = tied_head(model) is not None
    table = QuantizedEmbedding(embedding, method, backend)
    model.set_input_embeddings(table)
    yield embedding.weight.numel(), table.num_bytes
    if isinstance(head, nn.Linear):
        layer = QuantizedLinear(head, method, backend, quantized=table.quantized if tied else None)
        model.set_output_embeddings(layer)
        if not tied:
            yield head.weight.numel(), layer.num_bytes


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every QuantizedLinear (QuantizedEmbedding) with a plain nn.Linear (nn.Embedding) holding its
    dequantized weight, in place; a head that shared the embedding's quantized copy is tied to it again."""
    from lorakit.quant.embedding import QuantizedEmbedding

    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(table, QuantizedEmbedding):
        embedding = nn.Embedding(table.num_embeddings, table.embedding_dim, table.padding_idx, dtype=dtype,
                                 device=table.weight.device)
        with torch.no_grad():
            embedding.weight.copy_(table.quantized.dequantize(dtype))
        embedding.requires_grad_(False)
        model.set_input_embeddings(embedding)
        head = model.get_output_embeddings()
        if isinstance(head, QuantizedLinear) and head.quantized is table.quantized:
            tied = nn.Linear(head.in_features, head.out_features, bias=False, dtype=dtype,
                             device=embedding.weight.device)
            tied.weight = embedding.weight
            model.set_output_embeddings(tied)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=module.bias.device if module.bias is not None else None, dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(module.dequantized(dtype))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            linear.requires_grad_(False)
            set_submodule(model, name, linear)
    return model


def _return_freed_memory() -> None:
    """Hand the 16-bit weights just freed back to the OS (glibc keeps freed heap otherwise, and the process
    would stay as large as before quantizing)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _unique_parameters(model: nn.Module):
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p
