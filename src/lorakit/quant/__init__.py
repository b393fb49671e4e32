"""A frozen base in 4 or 8 bits (QLoRA): NF4 with double quantization, or int8 weight-only.

    quantize_model(model, "nf4" | "int8", backend="auto")   linear layers -> QuantizedLinear, in place
    dequantize_model(model, dtype)                          back to plain nn.Linear (merging, export)

Two backends compute the same weights: bitsandbytes where it runs, and plain PyTorch everywhere.
"""

from lorakit.quant.linear import BACKENDS, METHODS, QuantizedLinear
from lorakit.quant.model import QuantizationReport, dequantize_model, quantize_model, resolve_backend

__all__ = ["BACKENDS", "METHODS", "QuantizationReport", "QuantizedLinear", "dequantize_model",
           "quantize_model", "resolve_backend"]
