"""Attention of a batch of rows over their paged keys and values (`kv_cache.py`).

Every query at position p attends to its row's keys at positions j <= p:

    a = softmax(q k^T · scale + mask) v,     mask_pj = 0 if j <= p else -inf

Two forms compute it:

    "gather"  copy each row's blocks into a contiguous (n, kv_heads, length, d) tensor and call
              `scaled_dot_product_attention` (its fused causal kernel when every row starts at 0): the
              reference, what runs for longer spans (T > KERNEL_MAX_QUERIES, where the copy is small
              beside the T × length scores) and on GPUs
    "kernel"  up to KERNEL_MAX_QUERIES queries a row on a CPU in fp32 (decode; an aLoRA's invocation or a
              chat turn's new tokens after a cached history): the compiled kernel
              (`paged_attention_cpu.cpp`) reads every key and value in the block that holds it, no copy

They agree to float rounding (tests/test_paged_attention.py): greedy tokens are identical.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lorakit.engine.kv_cache import KVCache

KERNEL_MAX_QUERIES = 32  # past about 48 queries, gathering and a batched SDPA is faster (L = 1,500, d = 32)


class PagedAttention:
    def __init__(self, kv: KVCache, heads: int, scale: float, use_kernel: Optional[bool] = None):
        """use_kernel: None to use the compiled decode kernel where it can be built and applies."""
        self.kv, self.heads, self.scale = kv, heads, scale
        kernel = None
        if use_kernel is not False and kv.device.type == "cpu" and kv.dtype == torch.float32:
            from lorakit.engine.lora_kernel import cpu_kernel

            module = cpu_kernel()
            kernel = getattr(module, "paged_attention", None) if module is not None else None
        self._kernel = kernel

    @property
    def form(self) -> str:
        return "kernel" if self._kernel is not None else "gather"

    def __call__(self, layer: int, q: torch.Tensor, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q (n, heads, T, d) at positions (n, T), keys and values already written; returns (n, heads, T, d)."""
        t = q.shape[2]
        if t <= KERNEL_MAX_QUERIES and self._kernel is not None:
            out = self._kernel(q.transpose(1, 2).contiguous(), positions.contiguous(), self.kv.keys[layer],
                               self.kv.values[layer], tables, self.scale)   # (n, T, heads, d)
            return out.transpose(1, 2)
        length = int(positions.max()) + 1
        keys, values = self.kv.gather(layer, tables, length)
        gqa = self.heads != keys.shape[1]
        if length == t and not bool(positions[:, 0].any()):
            # Every row starts at 0 (nothing cached): query i sees keys [0, i], the plain causal mask, which
            # the fused kernel applies without reading a mask (a padded row's extra queries are discarded).
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.scale, enable_gqa=gqa)
        mask = torch.arange(length, device=q.device) <= positions[:, None, :, None]  # (n, 1, T, length)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
