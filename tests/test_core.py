"""The LoRA core on its own: the math by hand, merging, switching, freezing, training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.layers import LoraLayer
from lorakit.core.trainable_copy import TrainableCopy
from tiny_models import BUILDERS, output_of


def _hand_sized_linear() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
        model[0].bias.copy_(torch.tensor([0.5, -0.5]))
    return model


def _set_factors(layer: LoraLayer, a, b, name="default") -> None:
    with torch.no_grad():
        layer.lora_A[name].copy_(torch.tensor(a))
        layer.lora_B[name].copy_(torch.tensor(b))


def test_golden_values_of_the_lora_update():
    """h = W x + b + (alpha/r) B A x, worked by hand.

    W x + b = [1+2, 1-1] + [0.5, -0.5] = [3.5, -0.5];  A x = 1+2+3 = 6;  B A x = [6, -6];  s = 2/1
    h = [3.5 + 12, -0.5 - 12] = [15.5, -12.5]
    """
    model = _hand_sized_linear()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=1, lora_alpha=2, target_modules=["0"]))
    _set_factors(model[0], [[1.0, 2.0, 3.0]], [[1.0], [-1.0]])
    x = torch.ones(1, 3)
    torch.testing.assert_close(model(x), torch.tensor([[15.5, -12.5]]), atol=0, rtol=0)

    lorakit.merge_adapter(model)  # W' = W + s B A = W + 2 [[1, 2, 3], [-1, -2, -3]]
    torch.testing.assert_close(model[0].base_layer.weight, torch.tensor([[3.0, 4.0, 8.0], [-2.0, -3.0, -7.0]]))
    torch.testing.assert_close(model(x), torch.tensor([[15.5, -12.5]]), atol=0, rtol=0)


def test_golden_value_of_rslora_scale():
    """rsLoRA scales by alpha / sqrt(r): r=4, alpha=4 gives s=2 (plain LoRA: 1)."""
    for use_rslora, scale in ((False, 1.0), (True, 2.0)):
        model = _hand_sized_linear()
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=4, target_modules=["0"], use_rslora=use_rslora))
        assert model[0].scaling["default"] == scale


def test_golden_values_of_dora():
    """W = [[3, 4], [0, 1]], B A = [[0, 0], [1, 0]], s = 1  ->  W + sBA = [[3, 4], [1, 1]], row norms [5, √2].

    The magnitude starts at [5, √2] (no change); with m = [10, √2] row 0 doubles: W' = [[6, 8], [1, 1]],
    so h(x=[1, 1]) = [14, 2].
    """
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=1, lora_alpha=1, target_modules=["0"], use_dora=True))
    layer = model[0]
    _set_factors(layer, [[1.0, 0.0]], [[0.0], [1.0]])
    lorakit.core.variants.DoraVariant().init(layer, "default")
    torch.testing.assert_close(layer.lora_magnitude_vector["default"], torch.tensor([5.0, math.sqrt(2)]))
    with torch.no_grad():
        layer.lora_magnitude_vector["default"][0] = 10.0
    x = torch.ones(1, 2)
    torch.testing.assert_close(model(x), torch.tensor([[14.0, 2.0]]))
    lorakit.merge_adapter(model)
    torch.testing.assert_close(layer.base_layer.weight, torch.tensor([[6.0, 8.0], [1.0, 1.0]]))
    lorakit.unmerge_adapter(model)
    torch.testing.assert_close(layer.base_layer.weight, torch.tensor([[3.0, 4.0], [0.0, 1.0]]))


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("arch", BUILDERS)
def test_merge_then_unmerge_round_trip(arch, use_dora):
    model, inputs = BUILDERS[arch]()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False,
                                                  use_dora=use_dora))
    unmerged = output_of(model, inputs)
    lorakit.merge_adapter(model)
    torch.testing.assert_close(output_of(model, inputs), unmerged, atol=1e-5, rtol=0)
    lorakit.unmerge_adapter(model)
    torch.testing.assert_close(output_of(model, inputs), unmerged, atol=1e-5, rtol=0)
    for name, param in model.named_parameters():
        key = name.replace(".base_layer", "")
        if key in original:
            error = (param - original[key]).norm() / original[key].norm().clamp_min(1e-12)
            assert error <= 1e-6, f"{name}: relative error {error:.2e} after unmerge"


@pytest.mark.parametrize("arch", BUILDERS)
def test_merge_and_unload_leaves_plain_torch_modules(arch):
    model, inputs = BUILDERS[arch]()
    plain_types = {name: type(m) for name, m in model.named_modules()}
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    adapted = output_of(model, inputs)
    returned = lorakit.merge_and_unload(model)
    assert returned is model
    assert {name: type(m) for name, m in model.named_modules()} == plain_types
    assert not hasattr(model, "lorakit_adapters")
    assert all(p.requires_grad for p in model.parameters()), "base parameters are trainable again"
    torch.testing.assert_close(output_of(model, inputs), adapted, atol=1e-5, rtol=0)


def test_merge_and_unload_keeps_the_trained_head_of_modules_to_save():
    model, inputs = BUILDERS["vit"]()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["classifier"]))
    with torch.no_grad():
        model.classifier.modules_to_save["default"].bias.fill_(3.0)
    adapted = output_of(model, inputs)
    lorakit.merge_and_unload(model)
    assert isinstance(model.classifier, nn.Linear) and torch.all(model.classifier.bias == 3.0)
    torch.testing.assert_close(output_of(model, inputs), adapted, atol=1e-5, rtol=0)


def test_unmerge_restores_a_bf16_base_to_its_rounding():
    model, inputs = BUILDERS["llama"]()
    model.to(torch.bfloat16)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].dtype == torch.float32, "adapters of a half-precision base train in fp32"
    unmerged = output_of(model, inputs)
    lorakit.merge_adapter(model)
    assert layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(output_of(model, inputs), unmerged, atol=0.1, rtol=0.05)
    lorakit.unmerge_adapter(model)
    assert ((layer.weight.float() - before.float()).abs() <= 0.02 * before.float().abs() + 1e-2).all()


def test_disable_adapters_runs_the_base_model_merged_or_not():
    model, inputs = BUILDERS["llama"]()
    base = output_of(model, inputs)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    adapted = output_of(model, inputs)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(output_of(model, inputs), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(output_of(model, inputs), adapted, atol=1e-5, rtol=0)
    lorakit.merge_adapter(model)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(output_of(model, inputs), base, atol=1e-5, rtol=0)
    assert model.model.layers[0].self_attn.q_proj.merged_adapters == ["default"], "merged again after the block"
    torch.testing.assert_close(output_of(model, inputs), adapted, atol=1e-5, rtol=0)


def test_only_the_active_adapter_trains_and_switching_changes_the_output():
    model, inputs = BUILDERS["llama"]()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights=False), "a")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False), "b")
    assert lorakit.active_adapter(model) == "b"
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b" in name and "v_proj" in name for name in trainable)
    out_b = output_of(model, inputs)
    lorakit.set_adapter(model, "a")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".a" in name and "q_proj" in name for name in trainable)
    assert not torch.allclose(output_of(model, inputs), out_b)
    lorakit.delete_adapter(model, "a")
    assert list(lorakit.list_adapters(model)) == ["b"] and lorakit.active_adapter(model) is None


def test_trainable_parameters_counts_exactly_the_adapter():
    """q_proj (32 -> 32) and v_proj (32 -> 16) in 2 layers at r=8: 2 * 8 * ((32 + 32) + (32 + 16)) = 1792."""
    model, _ = BUILDERS["llama"]()
    total_before = sum(p.numel() for p in model.parameters())
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainable, total = lorakit.trainable_parameters(model)
    assert trainable == 1792 and total == total_before + 1792
    report = lorakit.parameter_report(model)
    assert report == f"trainable params: 1,792 || all params: {total:,} || trainable%: {100 * 1792 / total:.4f}"


def test_a_training_step_moves_only_the_adapter():
    model, inputs = BUILDERS["llama"]()
    frozen = copy.deepcopy(model.state_dict())
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        key = name.replace(".base_layer", "")
        if key in frozen:
            assert torch.equal(param, frozen[key]), f"base parameter {name} changed"
    assert model.model.layers[0].self_attn.q_proj.lora_B["default"].abs().sum() > 0


def test_new_wrappers_follow_the_models_eval_mode():
    model, inputs = BUILDERS["llama"]()  # eval mode
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_dropout=0.5, target_modules="all-linear",
                                                  init_lora_weights=False))
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(output_of(model, inputs), output_of(model, inputs), atol=0, rtol=0)


def test_wrappers_are_the_only_new_modules():
    model, _ = BUILDERS["vit"]()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "projection"],
                                                  modules_to_save=["classifier"]))
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, (LoraLayer, TrainableCopy))}
    assert kinds == {"LoraLinear", "LoraConv", "TrainableCopy"}


def test_default_targets_for_known_architectures():
    for arch, expected in (("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"]), ("t5", ["q", "v"]),
                           ("vit", ["q_proj", "v_proj"])):
        model, _ = BUILDERS[arch]()
        lorakit.add_adapter(model, lorakit.LoraConfig())
        assert lorakit.list_adapters(model)["default"].target_modules == expected
