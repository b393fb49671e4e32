"""`QuantizedEmbedding`: an embedding table stored in NF4 or int8, dequantized only for the rows looked up.

Opt-in (`quantize_model(..., embeddings=True)`, `--quantize-embeddings`): QLoRA keeps embeddings and the
output head in 16 bits, which is right for large models, where they are a few percent of the weights; in
a small model with a large vocabulary they dominate what is left (18% of the embedded model's parameters
are its tied embedding table). A head tied to the table shares its quantized copy.

    NF4:  row t of a (V, D) table with D a multiple of 64 is blocks [t·D/64, (t+1)·D/64): its codes and
          block maxima are gathered and only those rows are dequantized. Other widths dequantize the table.
    int8: row t is q_t · s_t / 127, with a scale per row, as the linear layers store theirs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.quant.int8 import INV_127, Int8Weight
from lorakit.quant.linear import QuantizedWeight, follow_module_move, quantize
from lorakit.quant.nf4 import BLOCK, NF4Weight, byte_pairs


class QuantizedEmbedding(nn.Module):
    is_quantized_embedding = True

    def __init__(self, embedding: nn.Embedding, method: str, backend: str = "torch"):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.method = method
        self.compute_dtype = embedding.weight.dtype
        self.quantized: QuantizedWeight = quantize(embedding.weight, method, backend)

    @property
    def num_bytes(self) -> int:
        return self.quantized.num_bytes

    @property
    def weight(self) -> torch.Tensor:
        """The whole dequantized table (V, D): a fresh tensor, for reading."""
        return self.quantized.dequantize(self.compute_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.quantized
        if isinstance(q, Int8Weight):
            rows = q.values[ids].float() * (q.row_absmax[ids].unsqueeze(-1) * INV_127)
            return rows.to(self.compute_dtype)
        if self.embedding_dim % BLOCK:
            return F.embedding(ids, self.weight, self.padding_idx)
        return self._nf4_rows(q, ids)

    def _nf4_rows(self, q: NF4Weight, ids: torch.Tensor) -> torch.Tensor:
        d = self.embedding_dim
        codes = q.packed.view(self.num_embeddings, d // 2)[ids]                     # (..., D/2) bytes
        values = byte_pairs(str(codes.device))[codes.int()].reshape(*ids.shape, d)   # (..., D) levels
        scales = q.block_absmax().view(self.num_embeddings, d // BLOCK)[ids]       # (..., D/64)
        return (values * scales.repeat_interleave(BLOCK, dim=-1)).to(self.compute_dtype)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        return follow_module_move(self, fn)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, method={self.method}, compute_dtype={self.compute_dtype}"


def tied_head(model: nn.Module) -> Optional[nn.Linear]:
    """The output head if it shares its weight with the input embedding, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(head, nn.Linear) and isinstance(embedding, nn.Embedding) and head.weight is embedding.weight:
        return head
    return None
