"""The forward pass of a Llama-family decoder over a block of cache rows, each row with its own adapter.

One call runs T new tokens for n sequences, each with its block table (n, max_blocks) in the paged cache:

    x = embed(tokens)                                     (n, T, H)
    per layer:
        qkv = rmsnorm(x) @ W_qkv^T  (+ LoRA of q, k, v)   (n, T, (heads + 2·kv_heads)·d)
        rotary(q, k) at each token's position; k, v written to the cache at those positions
        a   = softmax(q k^T · scale + mask) v             a key at position j is visible to a query at
                                                          position p iff j <= p (`paged_attention.py`)
        x  += a @ W_o^T (+ LoRA of o)
        x  += (silu(g) * u) @ W_down^T (+ LoRA of down),  [g, u] = rmsnorm(x) @ W_gate_up^T (+ LoRA)
    logits = lm_head(rmsnorm(x[last token of each row]))  (n, vocab), fp32

Prefill passes the prompts' new parts right-padded (T = the longest; a row may start past 0, where its
cached prefix ends), with `valid` marking the real tokens: padding writes nothing to the cache, and its
positions repeat the row's last one so its (discarded) attention stays finite. Decode passes T = 1.
The norms, rotary embedding and activation are the model's own modules, so checkpoint variants (rope scaling, Qwen2's
biases) behave as in transformers, against which the engine is tested.

Every projection runs in the fastest form this machine offers (see `projection.py`). When that form holds W
in its own layout ("packed", "panels") and the engine owns its model (`hold_weights_once`), the plain
weights are let go once packed, so the layers' weights are held once: the model's own linear modules are
emptied, and `module_weights()` unpacks them for the length of a call that runs the model's modules
(routing at a deeper layer).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Iterator, Optional

import torch
from torch import nn

from lorakit.engine.kv_cache import KVCache
from lorakit.engine.layout import GROUPS, DecoderLayout, fuse_group_weights
from lorakit.engine.lora_slots import LoraBatch
from lorakit.engine.paged_attention import PagedAttention
from lorakit.engine.projection import OWN_LAYOUT, Projection, choose_form

Weights = list[dict[str, Projection]]


class DecoderRunner:
    def __init__(self, model: nn.Module, layout: DecoderLayout, kv: KVCache, attention_kernel: Optional[bool] = None,
                 hold_weights_once: bool = False):
        self.model, self.layout, self.kv = model, layout, kv
        fused = fuse_group_weights(model, layout)
        self.form = choose_form([group.weight for group in fused[0].values()])
        self.base_weights: Weights = [{name: Projection(group.weight, group.bias, self.form)
                                       for name, group in groups.items()} for groups in fused]
        self._modules_emptied = False
        self._module_lock = threading.Lock()
        if hold_weights_once and self.form in OWN_LAYOUT and not any(
                getattr(m, "is_quantized_linear", False) for m in self._linear_modules()):
            del fused
            self._empty_modules()
        head = model.lm_head
        self.head = Projection(head.weight, head.bias, self.form)
        config = model.config
        attention = layout.layers[0].self_attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scale = attention.head_dim, attention.scaling
        self.apply_rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        self.split_qkv = layout.shapes["qkv"].out_features
        self.split_gate_up = layout.shapes["gate_up"].out_features
        self.attention = PagedAttention(kv, self.heads, self.scale, attention_kernel)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor, last_index: torch.Tensor,
                lora: Optional[LoraBatch] = None, weights: Optional[Weights] = None,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (n, vocab) at `last_index` (n,) of each row; tokens and positions: (n, T); tables: (n, max_blocks)
        int64, each row's blocks, holding its positions up to the largest in `positions`; valid: (n, T) bool
        (None: every token), the tokens whose keys and values are written to the cache."""
        weights = weights if weights is not None else self.base_weights
        n, t = tokens.shape
        inner = self.model.model
        x = inner.embed_tokens(tokens)
        cos, sin = inner.rotary_emb(x, positions)
        blocks, offsets = self.kv.slots(tables, positions)
        for index, layer in enumerate(self.layout.layers):
            def linear(group: str, h: torch.Tensor) -> torch.Tensor:
                y = weights[index][group](h)
                return y if lora is None else lora.apply(index, group, h, y)

            q, k, v = linear("qkv", layer.input_layernorm(x)).split(self.split_qkv, -1)
            q = q.view(n, t, self.heads, self.head_dim).transpose(1, 2)      # (n, heads, T, d)
            k = k.view(n, t, self.kv_heads, self.head_dim).transpose(1, 2)   # (n, kv_heads, T, d)
            v = v.view(n, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self.apply_rotary(q, k, cos, sin)
            self.kv.write(index, blocks, offsets, k, v, valid)
            attended = self.attention(index, q, tables, positions)           # (n, heads, T, d)
            x = x + linear("o", attended.transpose(1, 2).reshape(n, t, self.heads * self.head_dim))
            gate, up = linear("gate_up", layer.post_attention_layernorm(x)).split(self.split_gate_up, -1)
            x = x + linear("down", layer.mlp.act_fn(gate) * up)
        last = x[torch.arange(n, device=x.device), last_index]
        return self.head(inner.norm(last)).float()

    def forward_prompts(self, tokens: torch.Tensor, positions: torch.Tensor, last_index: torch.Tensor,
                        lora: Optional[LoraBatch] = None, weights: Optional[Weights] = None) -> torch.Tensor:
        """`forward` for whole prompts (n, T) outside the scheduler (tests, benchmarks): on blocks taken for
        this call and given back after it."""
        length = int(positions.max()) + 1
        tables = [[] for _ in range(tokens.shape[0])]
        try:
            for table in tables:
                self.kv.extend(table, length)
            return self.forward(tokens, positions, torch.tensor(tables, device=tokens.device), last_index, lora,
                                weights)
        finally:
            for table in tables:
                self.kv.release(table)

    # --- the model's own linear modules, when the weights are held once ------------------------------------
    def _linear_modules(self):
        for layer in self.layout.layers:
            for sub, projs in GROUPS.values():
                for proj in projs:
                    yield getattr(getattr(layer, sub), proj)

    def _module_weights(self):
        """(module, its rows of its group's W) for every linear module of the layers."""
        for layer, groups in zip(self.layout.layers, self.base_weights):
            for group, (sub, projs) in GROUPS.items():
                weight, offset = groups[group].weight, 0
                for proj in projs:
                    module = getattr(getattr(layer, sub), proj)
                    yield module, weight[offset:offset + module.out_features]
                    offset += module.out_features

    def _empty_modules(self) -> None:
        for projection in (p for groups in self.base_weights for p in groups.values()):
            projection.drop_plain()
        for module in self._linear_modules():
            module.weight.data = module.weight.data.new_empty((0,))
        self._modules_emptied = True

    @contextlib.contextmanager
    def module_weights(self) -> Iterator[None]:
        """The model's linear modules usable for the length of the block (a no-op unless they were emptied:
        then each group is unpacked, exactly, and let go again after)."""
        if not self._modules_emptied:
            yield
            return
        with self._module_lock:
            for module, weight in self._module_weights():
                module.weight.data = weight
            try:
                yield
            finally:
                for module in self._linear_modules():
                    module.weight.data = module.weight.data.new_empty((0,))

    def merged_weights(self, deltas: list[dict[str, torch.Tensor]]) -> Weights:
        """The weights of a step on one adapter merged in: W + ΔW for each group in `deltas` (per layer, the
        update s·B A of each group the adapter adapts; the sums are written into them), and the base's own
        projections for the rest. The base weights are never written, so going back to them is exact
        however often this is called."""
        return [{group: base.plus(layer_deltas[group]) if group in layer_deltas else base
                 for group, base in groups.items()}
                for groups, layer_deltas in zip(self.base_weights, deltas)]
