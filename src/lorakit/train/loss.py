"""Next-token loss summed over labelled tokens, computing logits only where there is a label.

For a batch with labels y (B, T), -100 meaning "no loss", the loss of one micro-batch is
`Σ_{b,t: y[b,t+1] ≠ -100} CE(logits[b,t], y[b,t+1])`, a *sum*. The training step divides the sums of all
its micro-batches by their total label count, so every labelled token weighs the same under gradient
accumulation (averaging per-micro-batch means would over-weight short micro-batches).

`labelled_token_loss` runs the decoder, gathers the hidden states at labelled positions (N, H) and applies
the output head to those alone: on instruction data most positions are prompt, so the (N, V) logits are a
fraction of the (B·T, V) ones a plain `model(labels=...)` builds. A frozen, bias-free head (the usual case:
LoRA leaves lm_head alone) goes further through `frozen_head_cross_entropy`, which never holds more than a
chunk of the logits. `reference_token_loss` is the plain path the fast ones are tested against; models the
fast path does not know (no decoder/head split, soft-capped or scaled logits) use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

IGNORE = -100
CHUNK_LOGITS = 1 << 22      # logits per chunk of frozen_head_cross_entropy: 16 MB in fp32


def _decoder_and_head(model):
    """(decoder stack, output head) of a transformers *ForCausalLM, or None when the split is unsafe."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, "model", None)
    if head is None or decoder is None or not type(model).__name__.endswith("ForCausalLM"):
        return None
    return decoder, head


def _model_inputs(batch) -> dict:
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
    if batch.attention_mask is not None:
        inputs["attention_mask"] = batch.attention_mask
    return inputs


def labelled_token_loss(model, batch) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled tokens (a 0-dim fp32 tensor)."""
    parts = _decoder_and_head(model)
    if parts is None:
        return reference_token_loss(model, batch)
    decoder, head = parts
    hidden = decoder(**_model_inputs(batch), use_cache=False).last_hidden_state   # (B, T, H)
    targets = batch.labels[:, 1:]                                                   # (B, T-1)
    keep = targets != IGNORE
    hidden, targets = hidden[:, :-1][keep], targets[keep]                          # (N, H), (N,)
    if _frozen_plain_head(head):
        return frozen_head_cross_entropy(hidden, head.weight, targets)
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _frozen_plain_head(head) -> bool:
    return isinstance(head, nn.Linear) and head.bias is None and not head.weight.requires_grad


def uses_chunked_head_loss(model) -> bool:
    """Whether `labelled_token_loss` takes `frozen_head_cross_entropy`'s chunked path for `model`."""
    parts = _decoder_and_head(model)
    return parts is not None and _frozen_plain_head(parts[1])


def frozen_head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ_i CE(h_i Wᵀ, y_i) for a frozen head W (V, H) and hidden states h (N, H): equal to
    `F.cross_entropy((h @ W.T).float(), y, reduction="sum")`, with the gradient with respect to h only."""
    return _FrozenHeadCrossEntropy.apply(hidden, weight, targets)


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Chunks of rows c: z = h_c Wᵀ (in the dtype the plain head computes in: autocast's, else h's), then in
    fp32 ℓ_c = Σ (logsumexp z − z[y]) and ∂ℓ_c/∂h_c = (softmax z − onehot y) W. The gradient is formed while z
    is at hand, so no (N, V) tensor outlives its chunk and none is kept for the backward pass, which only
    scales the stored (N, H) gradient by the incoming one."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(h) if want_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = max(1, CHUNK_LOGITS // w.shape[0])
        for start in range(0, h.shape[0], rows):
            y = targets[start:start + rows, None]                                       # (n, 1)
            logits = h[start:start + rows] @ w.t()                                      # (n, V)
            log_probs = torch.log_softmax(logits.float(), -1)                           # fp32
            picked = log_probs.gather(1, y)                                             # log p(y)
            loss -= picked.sum()
            if want_grad:
                probs = log_probs.exp_().scatter_(1, y, picked.exp() - 1)             # softmax − onehot
                grad[start:start + rows] = probs.to(dtype) @ w
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad.float() * grad_loss).to(ctx.hidden_dtype), None, None   # scaled in fp32, not in bf16


def reference_token_loss(model, batch) -> torch.Tensor:
    """The same sum from the model's full logits (B, T, V)."""
    logits = model(**_model_inputs(batch), use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch.labels[:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")

