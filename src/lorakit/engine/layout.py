"""Which linear layers of a Llama-family decoder the engine runs, fused into four groups per layer.

The engine computes each layer's projections as four matrix products instead of seven:

    qkv      = x  @ [W_q; W_k; W_v]^T     (q_proj, k_proj, v_proj share their input)
    o        = a  @ W_o^T
    gate_up  = x' @ [W_gate; W_up]^T      (gate_proj, up_proj share their input)
    down     = m  @ W_down^T

and the LoRA update of every projection in a group rides on the same two batched products (see
`lora_slots.py`). Fusing is done once at load time by concatenating the weights and making the model's
own parameters views into the fused tensor, so no weight is stored twice and the transformers model
stays usable (it is the reference the engine is tested against).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.errors import ModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
GROUPS = {  # group -> (submodule of the decoder layer, projections in output order)
    "qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "o": ("self_attn", ("o_proj",)),
    "gate_up": ("mlp", ("gate_proj", "up_proj")),
    "down": ("mlp", ("down_proj",)),
}
PROJECTION_GROUP = {proj: (group, index) for group, (_, projs) in GROUPS.items() for index, proj in enumerate(projs)}


@dataclass(frozen=True)
class GroupShape:
    """in_features and each projection's out_features of one fused group."""

    in_features: int
    out_features: tuple[int, ...]


@dataclass
class FusedGroup:
    """One group's fused base weight (total_out, in) and bias (total_out,) or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None


class DecoderLayout:
    """The shapes of every group and the module path of every projection of a Llama-family model."""

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(f"the serving engine runs {', '.join(SUPPORTED_MODEL_TYPES)} models; this one is "
                             f"{model_type!r}")
        self.layers = model.model.layers
        self.num_layers = len(self.layers)
        first = self.layers[0]
        self.shapes = {group: GroupShape(getattr(getattr(first, sub), projs[0]).in_features,
                                         tuple(getattr(getattr(first, sub), p).out_features for p in projs))
                       for group, (sub, projs) in GROUPS.items()}
        self.prefix = "model.layers"

    def module_path(self, layer: int, projection: str) -> str:
        sub = GROUPS[PROJECTION_GROUP[projection][0]][0]
        return f"{self.prefix}.{layer}.{sub}.{projection}"

    def parse_module_path(self, path: str) -> tuple[int, str] | None:
        """(layer, projection) for a path like model.layers.3.self_attn.q_proj; None if it is not one."""
        parts = path.split(".")
        if len(parts) != 5 or ".".join(parts[:2]) != self.prefix or not parts[2].isdigit():
            return None
        layer, sub, projection = int(parts[2]), parts[3], parts[4]
        if layer >= self.num_layers or projection not in PROJECTION_GROUP:
            return None
        if GROUPS[PROJECTION_GROUP[projection][0]][0] != sub:
            return None
        return layer, projection

    def in_out(self, projection: str) -> tuple[int, int]:
        group, part = PROJECTION_GROUP[projection]
        shape = self.shapes[group]
        return shape.in_features, shape.out_features[part]


def fuse_group_weights(model: nn.Module, layout: DecoderLayout) -> list[dict[str, FusedGroup]]:
    """Concatenate each group's weights once; the model's parameters become views into the result."""
    fused = []
    with torch.no_grad():
        for layer in layout.layers:
            groups = {}
            for group, (sub, projs) in GROUPS.items():
                modules = [getattr(getattr(layer, sub), p) for p in projs]
                weight = torch.cat([m.weight for m in modules]) if len(modules) > 1 else modules[0].weight.detach()
                biases = [m.bias for m in modules]
                bias = None
                if any(b is not None for b in biases):
                    bias = torch.cat([b if b is not None else torch.zeros(m.out_features, dtype=weight.dtype,
                                                                          device=weight.device)
                                      for b, m in zip(biases, modules)])
                if any(getattr(m, "is_quantized_linear", False) for m in modules):
                    groups[group] = FusedGroup(weight, bias)  # dequantized once: the quantized model's weights
                    continue
                offset = 0
                for m in modules:  # share storage: the model's own weights now live in the fused tensor
                    rows = m.out_features
                    m.weight.data = weight[offset:offset + rows]
                    if m.bias is not None:
                        m.bias.data = bias[offset:offset + rows]
                    offset += rows
                groups[group] = FusedGroup(weight, bias)
            fused.append(groups)
    return fused
