"""lorakit and PEFT compute the same thing and read each other's files.

For each tiny architecture (Llama, GPT-2 with Conv1D, T5, ViT) and each variant (plain LoRA, rsLoRA,
DoRA), on q/v only and on all linear layers: an adapter saved by lorakit loads in PEFT with the same
logits, and one saved by PEFT loads in lorakit with the same logits (fp32, atol 1e-5).
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from tiny_models import BUILDERS, QV_TARGETS, output_of

ATOL = 1e-5
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def _targets(arch: str, which: str):
    return QV_TARGETS[arch] if which == "qv" else "all-linear"


def _peft_load(arch: str, folder, **kwargs):
    base, _ = BUILDERS[arch]()
    return peft.PeftModel.from_pretrained(base, str(folder), **kwargs).eval()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("which", ["qv", "all"])
@pytest.mark.parametrize("arch", BUILDERS)
def test_lorakit_adapter_loads_in_peft_with_same_logits(arch, which, variant, tmp_path):
    model, inputs = BUILDERS[arch]()
    base_logits = output_of(model, inputs)
    config = lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=_targets(arch, which), init_lora_weights=False,
                                **VARIANTS[variant])
    lorakit.add_adapter(model, config)
    ours = output_of(model, inputs)
    assert not torch.allclose(ours, base_logits, atol=1e-3), "the adapter must change the output for the test to mean anything"

    lorakit.save_adapter(model, tmp_path)
    theirs = output_of(_peft_load(arch, tmp_path), inputs)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("which", ["qv", "all"])
@pytest.mark.parametrize("arch", BUILDERS)
def test_peft_adapter_loads_in_lorakit_with_same_logits(arch, which, variant, tmp_path):
    base, inputs = BUILDERS[arch]()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=_targets(arch, which), init_lora_weights=False,
                             **VARIANTS[variant])
    peft_model = peft.get_peft_model(base, config).eval()
    theirs = output_of(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)

    model, _ = BUILDERS[arch]()
    assert lorakit.load_adapter(model, tmp_path) == "default"
    torch.testing.assert_close(output_of(model, inputs), theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_files_match_peft_key_for_key(arch, tmp_path):
    """Re-saving with PEFT what lorakit wrote yields the same keys, shapes and values."""
    model, _ = BUILDERS[arch]()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path / "ours")
    _peft_load(arch, tmp_path / "ours").save_pretrained(tmp_path / "theirs")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert key.startswith("base_model.model.") and key.endswith((".lora_A.weight", ".lora_B.weight"))
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0)


def test_default_output_passes_vllms_rules(tmp_path):
    """One r, one alpha, unfused leaf names, nothing but lora_A/lora_B keys, safetensors metadata pt."""
    model, _ = BUILDERS["llama"]()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16 and config["lora_alpha"] == 32
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["bias"] == "none" and not config["use_dora"] and config["modules_to_save"] is None
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert config["task_type"] == "CAUSAL_LM"
    assert list(config) == sorted(config)
    with open(tmp_path / "adapter_model.safetensors", "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    metadata = header.pop("__metadata__")  # PEFT's format tag, and the base it was saved on (vLLM ignores it)
    assert metadata.pop("format") == "pt" and set(metadata) == {"lorakit.base"}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in header)


def test_several_named_adapters_round_trip_both_ways(tmp_path):
    """Two adapters with different targets and ranks on one model, each matching PEFT's."""
    model, inputs = BUILDERS["llama"]()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False), "a")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False, use_dora=True), "b")
    outputs = {}
    for name in ("a", "b"):
        lorakit.set_adapter(model, name)
        outputs[name] = output_of(model, inputs)
        lorakit.save_adapter(model, tmp_path / name, name)
    assert not torch.allclose(outputs["a"], outputs["b"])

    peft_model = _peft_load("llama", tmp_path / "a", adapter_name="a")
    peft_model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    for name in ("a", "b"):
        peft_model.set_adapter(name)
        torch.testing.assert_close(output_of(peft_model, inputs), outputs[name], atol=ATOL, rtol=0)

    peft_model.save_pretrained(tmp_path / "peft")  # PEFT's layout: a subfolder for each non-default adapter
    fresh, _ = BUILDERS["llama"]()
    assert lorakit.load_adapter(fresh, tmp_path / "peft" / "a") == "default"
    assert lorakit.load_adapter(fresh, tmp_path / "peft" / "b") == "b"  # "default" is taken: the folder's name
    lorakit.delete_adapter(fresh, "default")
    assert lorakit.load_adapter(fresh, tmp_path / "peft" / "a", name="a") == "a"
    for name in ("a", "b"):
        lorakit.set_adapter(fresh, name)
        torch.testing.assert_close(output_of(fresh, inputs), outputs[name], atol=ATOL, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_embedding_and_conv2d_targets_match_peft(use_dora, tmp_path):
    """nn.Embedding (Llama's embed_tokens) and nn.Conv2d (ViT's patch projection)."""
    for arch, targets in (("llama", ["embed_tokens", "q_proj"]), ("vit", ["projection", "q_proj"])):
        model, inputs = BUILDERS[arch]()
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=targets, init_lora_weights=False,
                                                      use_dora=use_dora))
        lorakit.save_adapter(model, tmp_path / arch)
        torch.testing.assert_close(output_of(model, inputs), output_of(_peft_load(arch, tmp_path / arch), inputs),
                                   atol=ATOL, rtol=0)


def test_modules_to_save_classifier_matches_peft(tmp_path):
    model, inputs = BUILDERS["vit"]()
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"],
                                init_lora_weights=False)
    lorakit.add_adapter(model, config)
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(0.5)  # as if the head had been trained
    assert model.classifier.modules_to_save["default"].weight.requires_grad
    lorakit.save_adapter(model, tmp_path)
    assert "base_model.model.classifier.weight" in load_file(tmp_path / "adapter_model.safetensors")
    theirs = output_of(_peft_load("vit", tmp_path), inputs)
    torch.testing.assert_close(output_of(model, inputs), theirs, atol=ATOL, rtol=0)

    fresh, _ = BUILDERS["vit"]()
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(output_of(fresh, inputs), theirs, atol=ATOL, rtol=0)


def test_rank_and_alpha_patterns_match_peft(tmp_path):
    model, inputs = BUILDERS["llama"]()
    config = lorakit.LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 4},
                                alpha_pattern={"v_proj": 32})
    lorakit.add_adapter(model, config)
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].shape[0] == 2 and model.model.layers[1].mlp.down_proj.rank("default") == 4
    assert model.model.layers[0].mlp.down_proj.rank("default") == 8
    lorakit.save_adapter(model, tmp_path)
    torch.testing.assert_close(output_of(model, inputs), output_of(_peft_load("llama", tmp_path), inputs),
                               atol=ATOL, rtol=0)


def test_dropout_in_training_matches_peft_under_the_same_seed(tmp_path):
    model, inputs = BUILDERS["llama"]()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_dropout=0.3, target_modules="all-linear",
                                                  init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path)
    peft_model = _peft_load("llama", tmp_path, is_trainable=True)
    model.train(), peft_model.train()
    torch.manual_seed(7)
    ours = model(**inputs).logits
    torch.manual_seed(7)
    theirs = peft_model(**inputs).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    model.eval()
    assert not torch.allclose(output_of(model, inputs), ours, atol=1e-4), "dropout must act in training only"


def test_pissa_init_matches_peft_and_saves_a_standard_adapter(tmp_path):
    """Same A, B and residual base as PEFT's PiSSA; the saved file works on the original base."""
    model, inputs = BUILDERS["llama"]()
    base_logits = output_of(model, inputs)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights="pissa"))
    base, _ = BUILDERS["llama"]()
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights="pissa"))
    ours_q = model.model.layers[1].self_attn.q_proj
    theirs_q = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    torch.testing.assert_close(ours_q.lora_A["default"], theirs_q.lora_A["default"].weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_q.lora_B["default"], theirs_q.lora_B["default"].weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_q.weight, theirs_q.base_layer.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(output_of(model, inputs), base_logits, atol=ATOL, rtol=0)  # starts at the base

    with torch.no_grad():  # as if trained: move A and B away from their initial values
        for _, layer in model.named_modules():
            if isinstance(layer, lorakit.core.layers.LoraLayer):
                layer.lora_B["default"].mul_(1.5)
    trained = output_of(model, inputs)
    lorakit.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16 and saved["init_lora_weights"] is True
    torch.testing.assert_close(output_of(_peft_load("llama", tmp_path), inputs), trained, atol=1e-4, rtol=0)


@pytest.mark.parametrize("targets, exclude", [
    ("all-linear", ["down_proj"]),
    (r"model\.layers\.0\..*_proj", None),
    (["self_attn.q_proj", "mlp.up_proj"], r".*layers\.1\..*"),
])
def test_target_and_exclude_specs_select_what_peft_selects(targets, exclude, tmp_path):
    model, inputs = BUILDERS["llama"]()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=targets, exclude_modules=exclude,
                                                  init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path)
    base, _ = BUILDERS["llama"]()
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=targets, exclude_modules=exclude))
    ours = {name for name, _ in model.named_modules() if name.endswith(("_proj",)) and hasattr(model.get_submodule(name), "lora_A")}
    theirs = {name.removeprefix("base_model.model.") for name, module in peft_model.named_modules()
              if hasattr(module, "lora_A") and name.endswith("_proj")}
    assert ours == theirs and ours
    torch.testing.assert_close(output_of(model, inputs), output_of(_peft_load("llama", tmp_path), inputs),
                               atol=ATOL, rtol=0)
