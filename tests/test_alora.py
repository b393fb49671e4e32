"""Activated LoRA: PEFT-compatible both ways, the update only from the last invocation on, and no LoRA work
before it."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit import Adapter, LoraConfig, add_adapter, save_adapter
from lorakit.core.variants.alora import invocation_offsets
from lorakit.errors import AdapterError, ConfigError
from tiny_models import llama

peft = pytest.importorskip("peft")

INVOCATION = [7, 8, 9]
# rows: invocation in the middle, twice (the last counts), at the very end, and absent
IDS = torch.tensor([[3, 4, 7, 8, 9, 10, 11, 12, 13],
                    [7, 8, 9, 20, 7, 8, 9, 21, 22],
                    [30, 31, 32, 33, 34, 35, 7, 8, 9],
                    [40, 41, 42, 43, 44, 45, 46, 47, 48]])


def alora_config(**changes) -> dict:
    return dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], alora_invocation_tokens=INVOCATION,
                task_type="CAUSAL_LM", init_lora_weights=False, **changes)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_offsets_count_the_positions_from_the_last_invocation_as_peft_does():
    assert invocation_offsets(IDS, INVOCATION) == [7, 5, 3, None]


def test_an_alora_adapter_trained_by_peft_runs_in_lorakit_within_1e_5(tmp_path):
    base, _ = llama()
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**alora_config())).eval()
    theirs.save_pretrained(tmp_path / "peft-alora")
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, tmp_path / "peft-alora")
    want, got = logits(theirs), logits(ours)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    plain = logits(base)
    assert torch.equal(got[3], plain[3])                     # no invocation: the base, exactly
    assert torch.equal(got[0, :2], plain[0, :2])             # before the invocation: the base, exactly
    assert not torch.allclose(got[0, 2:], plain[0, 2:])      # from it on: adapted
    assert torch.equal(got[1, :4], plain[1, :4])             # only the last occurrence activates


def test_an_alora_adapter_trained_by_lorakit_loads_in_peft_and_generates_the_same(tmp_path):
    base, _ = llama()
    ours = copy.deepcopy(base)
    torch.manual_seed(1)
    add_adapter(ours, LoraConfig(**alora_config()))
    save_adapter(ours, tmp_path / "ours")
    assert Adapter.read(tmp_path / "ours").config.alora_invocation_tokens == INVOCATION
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    want, got = logits(theirs), logits(ours.eval())
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    prompt = IDS[:1, :5]                                      # ends just after the invocation
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(input_ids=prompt, **settings), theirs.generate(input_ids=prompt, **settings))


def test_positions_before_the_invocation_do_no_lora_work_and_get_no_gradient():
    model, _ = llama()
    torch.manual_seed(2)
    add_adapter(model, LoraConfig(**alora_config()))
    layer = model.model.layers[0].self_attn.q_proj
    seen = []
    original = layer.lora_output
    layer.lora_output = lambda x, name: (seen.append(x.shape[0]), original(x, name))[1]
    out = model(input_ids=IDS).logits
    assert seen == [7 + 5 + 3]                                # only the covered positions, in one product
    out[3].sum().backward()                                   # the row without an invocation
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert all(g is None or not g.any() for g in grads)


def test_what_an_activated_lora_cannot_do_is_refused():
    model, _ = llama()
    with pytest.raises(ConfigError, match="DoRA"):
        LoraConfig(**alora_config(use_dora=True))
    with pytest.raises(ConfigError, match="non-empty list of token ids"):
        LoraConfig(r=4, alora_invocation_tokens=[])
    with pytest.raises(ConfigError, match="linear layers only"):
        add_adapter(copy.deepcopy(model), LoraConfig(**{**alora_config(), "target_modules": ["embed_tokens"]}))
    add_adapter(model, LoraConfig(**alora_config()))
    with pytest.raises(AdapterError, match="cannot do"):
        lorakit.merge_adapter(model)


def test_activated_loras_of_one_invocation_compose_exactly_and_keep_it(tmp_path):
    base, _ = llama()
    made = []
    for seed in (3, 4):
        model = copy.deepcopy(base)
        torch.manual_seed(seed)
        add_adapter(model, LoraConfig(**alora_config()))
        save_adapter(model, tmp_path / str(seed))
        made.append(Adapter.read(tmp_path / str(seed)))
    mix = lorakit.compose(made, [0.5, -1.0])
    assert mix.config.alora_invocation_tokens == INVOCATION
    models = [copy.deepcopy(base) for _ in range(3)]
    for model, adapter in zip(models, [mix, *made]):
        lorakit.load_adapter(model, adapter)
    x = torch.randn(10, 32)                                      # one adapted layer's update, summed exactly

    def update(model):
        return model.model.layers[0].self_attn.q_proj.lora_output(x, model.lorakit_adapters.active)

    assert torch.allclose(update(models[0]), 0.5 * update(models[1]) - update(models[2]), atol=1e-5)
    other = Adapter.from_tensors(made[1].config.replace(alora_invocation_tokens=[1, 2]), made[1].tensors)
    with pytest.raises(ConfigError, match="different invocations"):
        lorakit.compose([made[0], other])


def test_lorakit_train_alora_invocation_refuses_rows_without_it_or_inserts_it(tmp_path):
    import json
    import subprocess
    import sys

    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"Reverse the words: red {w} blue\nAnswer:", "completion": f" blue {w} red"} for w in
            ("green", "tan", "gold", "pink")] + [{"prompt": "Say hi.", "completion": " hi"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [sys.executable, "-m", "lorakit.cli", "train", "--data", str(data), "--eval-data", str(data),
              "--alora-invocation", "\nAnswer:", "--max-steps", "2", "--eval-steps", "2", "--eval-samples", "2",
              "--batch-size", "2", "--max-length", "32", "--no-progress", "--report-to", "none"]
    refused = subprocess.run(common + ["--output", str(tmp_path / "refused")], capture_output=True, text=True)
    assert refused.returncode == 2 and "1 of 5 rows" in refused.stderr and "--alora-insert" in refused.stderr
    done = subprocess.run(common + ["--alora-insert", "--output", str(tmp_path / "run")], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    adapter = Adapter.read(tmp_path / "run")
    assert adapter.config.alora_invocation_tokens and adapter.config.task_type == "CAUSAL_LM"
    assert peft.LoraConfig.from_pretrained(str(tmp_path / "run")).alora_invocation_tokens == \
        adapter.config.alora_invocation_tokens
