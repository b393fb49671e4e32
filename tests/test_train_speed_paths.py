"""Every fast path of the training step agrees with the plain computation it replaces."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.train import loss as loss_module
from lorakit.train.loss import IGNORE, frozen_head_cross_entropy, labelled_token_loss, reference_token_loss
from tiny_models import llama


def _head_problem(seed=0, rows=37, hidden=16, vocab=50):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=gen) * 0.3
    h = torch.randn(rows, hidden, generator=gen)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    return h, weight, targets


def _loss_and_grad(fn, h, weight, targets, autocast=False):
    h = h.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(h, weight, targets)
    (loss / len(targets)).backward()
    return loss.detach(), h.grad


def _plain(h, weight, targets):
    return F.cross_entropy((h @ weight.T).float(), targets, reduction="sum")


@pytest.mark.parametrize("chunk_rows", [1, 5, 37, 1000])
def test_frozen_head_cross_entropy_equals_the_plain_loss_and_gradient_in_fp32(monkeypatch, chunk_rows):
    h, weight, targets = _head_problem()
    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", chunk_rows * weight.shape[0])  # chunk edges inside the rows
    loss, grad = _loss_and_grad(frozen_head_cross_entropy, h, weight, targets)
    expected_loss, expected_grad = _loss_and_grad(_plain, h, weight, targets)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-7, rtol=1e-5)


def test_frozen_head_cross_entropy_under_bf16_autocast_matches_the_plain_head():
    """Same logits (bf16 matmul, as autocast runs the plain head), loss summed in fp32; the gradient differs
    only by where bf16 rounding happens."""
    h, weight, targets = _head_problem(rows=64, hidden=32, vocab=300)
    loss, grad = _loss_and_grad(frozen_head_cross_entropy, h, weight, targets, autocast=True)
    expected_loss, expected_grad = _loss_and_grad(_plain, h, weight, targets, autocast=True)
    assert loss.dtype == torch.float32 and grad.dtype == h.dtype
    torch.testing.assert_close(loss, expected_loss, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=2e-2 * expected_grad.abs().max().item(), rtol=0)


def test_frozen_head_cross_entropy_without_gradients_gives_the_loss_alone():
    h, weight, targets = _head_problem()
    with torch.no_grad():
        loss = frozen_head_cross_entropy(h, weight, targets)
    torch.testing.assert_close(loss, _plain(h, weight, targets), atol=1e-5, rtol=1e-6)


def _llama_batch(vocab=128, rows=3, width=11, seed=2):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, width), generator=gen)
    labels = ids.clone()
    labels[:, :4] = IGNORE          # a prompt without loss
    labels[1, -2:] = IGNORE
    return SimpleNamespace(input_ids=ids, labels=labels, attention_mask=None,
                           position_ids=torch.arange(width).expand(rows, -1),
                           label_tokens=int((labels[:, 1:] != IGNORE).sum()), tokens=rows * width)


def _loss_and_adapter_grads(model, loss_fn, batch, bf16):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]


def _assert_same_training_signal(fast, plain, bf16):
    """Losses and adapter gradients agree: tightly in fp32, to bf16 rounding under autocast."""
    (loss, grads), (expected_loss, expected_grads) = fast, plain
    torch.testing.assert_close(loss, expected_loss, atol=2e-2 if bf16 else 1e-4, rtol=1e-3 if bf16 else 1e-5)
    for got, expected in zip(grads, expected_grads):
        scale = max(expected.abs().max().item(), 1e-3)
        torch.testing.assert_close(got, expected, atol=(5e-2 if bf16 else 1e-5) * scale, rtol=0)


def _llama_with_adapter(bf16_base=False):
    model, _ = llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    if bf16_base:  # as build_model stores a frozen base for bf16 training
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.bfloat16()
    return model


@pytest.mark.parametrize("bf16", [False, True])
def test_labelled_token_loss_equals_the_full_logits_loss_with_a_frozen_head(bf16):
    model = _llama_with_adapter(bf16_base=bf16)
    twin, batch = copy.deepcopy(model), _llama_batch()
    _assert_same_training_signal(_loss_and_adapter_grads(model, labelled_token_loss, batch, bf16),
                                 _loss_and_adapter_grads(twin, reference_token_loss, batch, bf16), bf16)


@pytest.mark.parametrize("bf16", [False, True])
def test_eager_attention_chosen_for_cpu_bf16_trains_like_sdpa(bf16):
    from lorakit.train.precision import training_attention

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert training_attention("bf16", cpu, 256) == "eager"
    assert training_attention("bf16", cpu, 4096) == "sdpa"        # (T, T) probabilities would not fit
    assert training_attention("fp32", cpu, 256) == training_attention("bf16", cuda, 256) == "sdpa"
    model = _llama_with_adapter(bf16_base=bf16)
    model.set_attn_implementation("sdpa")
    eager, batch = copy.deepcopy(model), _llama_batch()
    eager.set_attn_implementation("eager")
    _assert_same_training_signal(_loss_and_adapter_grads(eager, labelled_token_loss, batch, bf16),
                                 _loss_and_adapter_grads(model, labelled_token_loss, batch, bf16), bf16)


def test_compiled_decoder_layers_compute_the_same_loss_and_gradients(tmp_path):
    """`--compile` (torch.compile of each decoder layer) against the plain layers, fp32, one step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.train.config import TrainConfig
    from lorakit.train.loss import labelled_token_loss
    from lorakit.train.setup import Runtime, build_model
    from lorakit.data import Batch

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4)).save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    batch = Batch(ids, ids.clone(), torch.arange(16).expand(2, -1), None, 30, 32)
    results = []
    for compiled in (False, True):
        model = build_model(TrainConfig(model=str(tmp_path), precision="fp32", compile=compiled, r=4), Runtime(),
                            "fp32")
        loss = labelled_token_loss(model, batch)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (plain_loss, plain_grads), (compiled_loss, compiled_grads) = results
    assert compiled_loss == pytest.approx(plain_loss, abs=1e-5)
    for plain, compiled in zip(plain_grads, compiled_grads):
        torch.testing.assert_close(compiled, plain, atol=1e-5, rtol=1e-4)
