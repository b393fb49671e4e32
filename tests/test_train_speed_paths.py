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

    assert training_attention("bf16", torch.device("cpu")) == "eager"
    assert training_attention("fp32", torch.device("cpu")) == training_attention("bf16", torch.device("cuda")) == "sdpa"
    model = _llama_with_adapter(bf16_base=bf16)
    model.set_attn_implementation("sdpa")
    eager, batch = copy.deepcopy(model), _llama_batch()
    eager.set_attn_implementation("eager")
    _assert_same_training_signal(_loss_and_adapter_grads(eager, labelled_token_loss, batch, bf16),
                                 _loss_and_adapter_grads(model, labelled_token_loss, batch, bf16), bf16)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("input_needs_grad", [False, True])
def test_fused_lora_linear_matches_the_reference_forward_and_backward(bf16, bias, input_needs_grad):
    """The one-node LoRA linear used while training gives the outputs and gradients of the plain path
    (base layer, then the variant's addmm)."""
    from lorakit.core.layers import LoraLayer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=bias))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    layer = model[0]
    if bf16:
        layer.base_layer.to(torch.bfloat16)
    x0 = torch.randn(3, 5, 24, dtype=torch.bfloat16 if bf16 else torch.float32)
    g = torch.randn(3, 5, 40)
    results = []
    for forward in (layer.forward, lambda x: LoraLayer.forward(layer, x)):
        x = x0.clone().requires_grad_(input_needs_grad)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = forward(x)
        y.backward(g.to(y.dtype))
        results.append([y.detach().float(), layer.lora_A["default"].grad, layer.lora_B["default"].grad]
                        + ([x.grad.float()] if input_needs_grad else []))
        layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        assert layer._fused_training_dtype(x0, "default") is not None  # the fused path did run above
    for got, expected in zip(*results):
        scale = max(expected.abs().max().item(), 1e-3)
        torch.testing.assert_close(got, expected, atol=(1e-2 if bf16 else 1e-6) * scale, rtol=0)


def test_fused_lora_linear_stays_off_where_it_does_not_apply():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["0"], lora_dropout=0.1))
    layer, x = model[0], torch.randn(2, 8)
    assert layer.train()._fused_training_dtype(x, "default") is None       # dropout active
    assert layer.eval()._fused_training_dtype(x, "default") is not None
    with torch.no_grad():
        assert layer._fused_training_dtype(x, "default") is None           # nothing to differentiate
    layer.base_layer.weight.requires_grad_(True)
    assert layer._fused_training_dtype(x, "default") is None               # a trainable base needs its gradient
