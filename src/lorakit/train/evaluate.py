"""Held-out evaluation: token loss, perplexity, and exact match by greedy generation.

loss = (Σ labelled-token cross-entropy) / (number of labelled tokens) over the held-out examples, the same
quantity training minimises; perplexity = exp(loss). Exact match generates greedily from each example's
prompt (prompt/completion: the prompt; chat: the conversation up to the last assistant turn, with the
template's generation prompt) and compares `generated.strip() == reference.strip()`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import psutil
import torch
from tqdm import tqdm

from lorakit.models import stop_token_ids
from lorakit.quant.linear import dequantized_while_inferring
from lorakit.train.loss import labelled_token_loss
from lorakit.train.precision import autocast


GENERATION_BATCH = 32      # prompts generated together when scoring exact match


@dataclass
class EvalSet:
    """Held-out data, tokenized once: a plan of batches for the loss, and (prompt ids, reference) pairs for
    exact match with the generation budget their longest reference needs."""
    plan: object                      # a BatchPlan over the held-out examples, unpacked
    prompts: list[tuple[list[int], str]]
    max_new_tokens: int


def build_eval_set(rows, tokenizer, *, max_length: int, batch_size: int, samples: int, invocation=None) -> EvalSet:
    """The EvalSet of held-out `rows`: all of them for the loss, the first `samples` scorable ones (text rows
    have no single answer) for exact match. With an aLoRA `invocation` (data.invocation), every example and
    prompt holds it, as in training."""
    from lorakit.data import BatchPlan, generation_prompt, row_format, tokenize_rows

    examples, _ = tokenize_rows(rows, tokenizer, max_length, "truncate")
    if invocation is not None:
        examples, _ = invocation.prepare(examples, max_length, "the held-out data", tokenizer)
    plan = BatchPlan(examples, batch_size=batch_size, max_length=max_length, pad_id=tokenizer.pad_token_id,
                     seed=0, packing=False)
    prompts = [generation_prompt(r, tokenizer) for r in rows if row_format(r) != "text"][:samples]
    if invocation is not None:
        prompts = [(ids, reference) for ids, reference in ((invocation.prompt(p), ref) for p, ref in prompts)
                   if ids is not None]
    longest = max((len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for _, ref in prompts), default=0)
    return EvalSet(plan, prompts, longest + 8)


def _cache_for(model, device: torch.device):
    """A static KV cache on the CPU where the model supports one: with a growing cache every decode step has a
    new attention shape, and oneDNN builds a bf16 kernel for each, which costs more than the step itself."""
    return "static" if device.type == "cpu" and getattr(model, "_can_compile_fullgraph", False) else None


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, precision: str = "fp32",
                    batch_size: int = 32, on_batch=None) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded batches), decoded without special tokens;
    `on_batch()` is called after each batch of `batch_size` prompts."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(model, tokenizer)
    texts: list[str] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = -(-max(len(p) for p in chunk) // 16) * 16      # few distinct shapes: see batches.collate_rows
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        with autocast(precision, device):
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                    max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                    pad_token_id=pad, temperature=None, top_p=None, top_k=None,
                                    cache_implementation=_cache_for(model, device))
        texts.extend(tokenizer.batch_decode(output[:, width:], skip_special_tokens=True))
        if on_batch is not None:
            on_batch()
    model.train(was_training)
    return texts


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


@torch.no_grad()
def evaluate(model, tokenizer, eval_set: EvalSet, *, precision: str, samples: int, progress: bool = False,
             label: str = "evaluating") -> dict:
    """{"loss", "perplexity", "exact_match", "exact_match_samples"} on the held-out set; `progress` shows a
    bar (on stderr, removed when done) over the loss batches and the generation batches."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_batches = eval_set.plan.epoch(0)
    chosen = eval_set.prompts[:samples]
    bar = tqdm(total=len(loss_batches) + -(-len(chosen) // GENERATION_BATCH), desc=label, unit="batch",
               leave=False, dynamic_ncols=True, file=sys.stderr, disable=not progress)
    total, count = 0.0, 0
    for rows in loss_batches:
        batch = eval_set.plan.collate(rows).to(device)
        with autocast(precision, device):
            total += labelled_token_loss(model, batch).item()
        count += batch.label_tokens
        bar.update()
    result = {"loss": total / max(count, 1)}
    result["perplexity"] = math.exp(min(result["loss"], 50.0))
    if chosen:
        # On a quantized base, generation would dequantize every weight for every token: hold them dequantized
        # for the call if that takes at most a quarter of the memory still free.
        with dequantized_while_inferring(model, budget_bytes=_free_bytes(device) // 4):
            generated = greedy_generate(model, tokenizer, [p for p, _ in chosen], eval_set.max_new_tokens,
                                        precision, batch_size=GENERATION_BATCH, on_batch=bar.update)
        hits = sum(g.strip() == ref.strip() for g, (_, ref) in zip(generated, chosen))
        result.update(exact_match=hits / len(chosen), exact_match_samples=len(chosen))
        result["examples"] = [{"reference": ref, "generated": g} for g, (_, ref) in list(zip(generated, chosen))[:3]]
    bar.close()
    model.train(was_training)
    return result
