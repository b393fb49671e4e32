"""Bad input gets a clear lorakit error, and a rejected call changes nothing.

Every case checks three things: the exception is a `lorakit.LorakitError` subclass (the command line
prints those without a traceback; anything else escaping is a bug), its message names the problem (the
file, key, field or module), and the model is exactly as it was before the call (same logits, same
parameters, same module tree, same adapters, no adapter left attached). Files are real files in
pytest's tmp_path; nothing is mocked.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.core.layers import LoraLayer
from lorakit.io import read_tensors
from tiny_models import BUILDERS, output_of

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"


# --- helpers -----------------------------------------------------------------------------------------
def _raises(exc_type, call, *needles: str) -> str:
    """Run `call`, expect `exc_type` (a LorakitError), and every needle in its message; return the message."""
    assert issubclass(exc_type, lorakit.LorakitError)
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in the error message:\n{message}"
    return message


class Snapshot:
    """Everything a rejected call must leave as it was."""

    def __init__(self, model, inputs) -> None:
        self.model, self.inputs = model, inputs
        self.logits = output_of(model, inputs)
        self.state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        self.modules = [(name, type(module)) for name, module in model.named_modules()]
        self.grads = {name: param.requires_grad for name, param in model.named_parameters()}
        self.adapters = lorakit.list_adapters(model)
        self.had_state = hasattr(model, "lorakit_adapters")
        self.active = getattr(getattr(model, "lorakit_adapters", None), "active", None)
        self.merged = {name: list(m.merged_adapters) for name, m in model.named_modules() if isinstance(m, LoraLayer)}

    def assert_unchanged(self) -> None:
        model = self.model
        assert [(name, type(module)) for name, module in model.named_modules()] == self.modules, \
            "the module tree changed (a wrapper was left in place or removed)"
        assert lorakit.list_adapters(model) == self.adapters
        assert hasattr(model, "lorakit_adapters") == self.had_state, "adapter state attached or removed"
        assert getattr(getattr(model, "lorakit_adapters", None), "active", None) == self.active
        assert {name: list(m.merged_adapters) for name, m in model.named_modules()
                if isinstance(m, LoraLayer)} == self.merged
        state = model.state_dict()
        assert state.keys() == self.state.keys()
        for key, value in self.state.items():
            assert torch.equal(state[key], value), f"{key} changed"
        assert {name: p.requires_grad for name, p in model.named_parameters()} == self.grads
        torch.testing.assert_close(output_of(model, self.inputs), self.logits, atol=0, rtol=0)


def _llama_with_adapter(name: str = "keep"):
    model, inputs = BUILDERS["llama"]()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False), name)
    return model, inputs


@pytest.fixture(params=["plain", "with_adapter"])
def target(request):
    """The model a bad call is made on: a bare Llama, or one already holding adapter 'keep'."""
    if request.param == "plain":
        return BUILDERS["llama"]()
    return _llama_with_adapter()


def _rewrite_tensors(path: Path, change) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _rewrite_config(folder: Path, change) -> Path:
    path = folder / CONFIG
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))
    return path


def _raw_safetensors(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


@pytest.fixture
def saved(tmp_path) -> Path:
    """A good adapter folder saved by lorakit from a Llama: q_proj and v_proj, r=4, non-zero B."""
    model, _ = BUILDERS["llama"]()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    return lorakit.save_adapter(model, tmp_path / "adapter")


def test_the_undamaged_folder_loads_and_changes_the_output(saved):
    """The control for every damaged-folder case below: the same folder, undamaged, loads fine."""
    model, inputs = BUILDERS["llama"]()
    base = output_of(model, inputs)
    assert lorakit.load_adapter(model, saved) == "default"
    assert not torch.allclose(output_of(model, inputs), base, atol=1e-4)


# --- LoraConfig --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": -1}, "r must be a positive integer"),
    ({"r": 1.5}, "r must be a positive integer"),
    ({"r": True}, "r must be a positive integer"),
    ({"r": "8"}, "r must be a positive integer"),
    ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_alpha": -4}, "lora_alpha"),
    ({"lora_alpha": math.nan}, "lora_alpha"),
    ({"lora_alpha": math.inf}, "lora_alpha"),
    ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"bias": "all"}, "bias='all'"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ({"target_modules": "q_proj("}, "target_modules='q_proj('"),
    ({"target_modules": []}, "target_modules is an empty list"),
    ({"target_modules": ["q_proj", ""]}, "target_modules entries"),
    ({"exclude_modules": "all-linear"}, "exclude_modules"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj']"),
    ({"rank_pattern": {"q_proj": -2}}, "rank_pattern['q_proj']"),
    ({"rank_pattern": {"q_proj(": 4}}, "rank_pattern key 'q_proj('"),
    ({"alpha_pattern": {"v_proj": 0}}, "alpha_pattern['v_proj']"),
    ({"use_rslora": "yes"}, "use_rslora"),
])
def test_impossible_config_values_are_rejected_naming_the_field(kwargs, field):
    message = _raises(lorakit.ConfigError, lambda: lorakit.LoraConfig(**kwargs), field)
    value = next(iter(kwargs.values()))
    if not isinstance(value, (list, dict)):
        assert repr(value) in message, "the message shows the offending value"


# --- add_adapter -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, needles", [
    ({"target_modules": ["qproj"]}, lorakit.TargetError, ["'qproj'", "matched no module", "q_proj"]),
    ({"target_modules": ["q_proj", "vproj"]}, lorakit.TargetError, ["'vproj'", "'v_proj'"]),
    ({"target_modules": r".*\.nothing_here"}, lorakit.TargetError, ["nothing_here", "matched no module"]),
    ({"target_modules": ["input_layernorm"]}, lorakit.TargetError, ["model.layers.0.input_layernorm", "RMSNorm"]),
    ({"target_modules": ["mlp"]}, lorakit.TargetError, ["model.layers.0.mlp", "gate_proj", "up_proj", "down_proj"]),
    ({"target_modules": ["q_proj"], "exclude_modules": ["k_prj"]}, lorakit.TargetError,
     ["exclude_modules entry 'k_prj'", "'k_proj'"]),
    ({"target_modules": ["q_proj"], "modules_to_save": ["lm_haed"]}, lorakit.TargetError,
     ["modules_to_save entry 'lm_haed'", "'lm_head'"]),
    ({"target_modules": ["embed_tokens", "q_proj"], "init_lora_weights": "pissa"}, lorakit.ConfigError,
     ["init_lora_weights='pissa'", "'model.embed_tokens'", "Embedding"]),
    ({"target_modules": ["q_proj", "embed_tokens"], "init_lora_weights": "pissa_niter_2"}, lorakit.ConfigError,
     ["'model.embed_tokens'", "Embedding"]),
])
def test_add_adapter_rejects_bad_targets_and_changes_nothing(target, kwargs, error, needles):
    model, inputs = target
    snapshot = Snapshot(model, inputs)
    config = lorakit.LoraConfig(r=4, **kwargs)
    _raises(error, lambda: lorakit.add_adapter(model, config, "new"), *needles)
    snapshot.assert_unchanged()


@pytest.mark.parametrize("typo, meant", [("qproj", "q_proj"), ("embed_tokns", "embed_tokens")])
def test_a_lone_typo_in_target_modules_gets_a_suggestion(typo, meant):
    model, inputs = BUILDERS["llama"]()
    snapshot = Snapshot(model, inputs)
    config = lorakit.LoraConfig(r=4, target_modules=[typo])
    try:
        _raises(lorakit.TargetError, lambda: lorakit.add_adapter(model, config), repr(typo),
                f"Did you mean {meant!r}")
    finally:
        snapshot.assert_unchanged()


def test_add_adapter_rejects_an_unsupported_layer_norm_target():
    model, inputs = BUILDERS["gpt2"]()
    snapshot = Snapshot(model, inputs)
    config = lorakit.LoraConfig(r=4, target_modules=["c_attn", "ln_1"])
    _raises(lorakit.TargetError, lambda: lorakit.add_adapter(model, config), "transformer.h.0.ln_1", "LayerNorm")
    snapshot.assert_unchanged()


def test_add_adapter_rejects_a_duplicate_name_and_keeps_the_first():
    model, inputs = _llama_with_adapter("default")
    snapshot = Snapshot(model, inputs)
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    _raises(lorakit.AdapterError, lambda: lorakit.add_adapter(model, config, "default"), "'default'", "already")
    snapshot.assert_unchanged()


@pytest.mark.parametrize("name", ["my.adapter", "has space", "", "a/b"])
def test_add_adapter_rejects_an_invalid_name(target, name):
    model, inputs = target
    snapshot = Snapshot(model, inputs)
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj"])
    _raises(lorakit.AdapterError, lambda: lorakit.add_adapter(model, config, name), repr(name), "no dots")
    snapshot.assert_unchanged()


def test_add_adapter_rejects_something_that_is_not_a_config():
    model, inputs = BUILDERS["llama"]()
    snapshot = Snapshot(model, inputs)
    _raises(lorakit.ConfigError, lambda: lorakit.add_adapter(model, {"r": 4, "target_modules": ["q_proj"]}),
            "LoraConfig", "dict")
    snapshot.assert_unchanged()


def test_add_adapter_rejects_a_pissa_rank_above_the_layers_rank(target):
    model, inputs = target
    snapshot = Snapshot(model, inputs)
    config = lorakit.LoraConfig(r=32, target_modules=["v_proj"], init_lora_weights="pissa")  # v_proj is 32 -> 16
    try:
        _raises(lorakit.ConfigError, lambda: lorakit.add_adapter(model, config, "new"),
                "'model.layers.0.self_attn.v_proj'", "r=32")
    finally:
        snapshot.assert_unchanged()


# --- load_adapter: damaged folders -------------------------------------------------------------------
def _delete_config(folder):
    (folder / CONFIG).unlink()
    return lorakit.AdapterFileError, [str(folder), CONFIG]


def _config_not_json(folder):
    (folder / CONFIG).write_text('{\n  "r": 8,\n  oops\n}\n')
    return lorakit.AdapterFileError, [str(folder / CONFIG), "not valid JSON", "line 3", "column 3"]


def _config_not_text(folder):
    (folder / CONFIG).write_bytes(b"\xff\xfe\x00garbage\x80")
    return lorakit.AdapterFileError, [str(folder / CONFIG)]


def _config_a_list(folder):
    (folder / CONFIG).write_text("[1, 2]")
    return lorakit.AdapterFileError, [str(folder / CONFIG), "JSON object"]


def _config_field(field, value, *needles):
    def damage(folder):
        path = _rewrite_config(folder, lambda data: data.__setitem__(field, value))
        return lorakit.AdapterFileError, [str(path), *needles]
    damage.__name__ = f"config_{field}_{value!r}"
    return damage


def _config_without(field):
    def damage(folder):
        path = _rewrite_config(folder, lambda data: data.pop(field))
        return lorakit.AdapterFileError, [str(path), repr(field), "missing"]
    damage.__name__ = f"config_without_{field}"
    return damage


class _TouchOnUnpickle:
    """Unpickling this creates the file at `path`: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _only_pickle(folder):
    marker = folder.parent / "UNPICKLED"
    (folder / WEIGHTS).unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    return lorakit.AdapterFileError, [str(folder), "adapter_model.bin", "pickle"]


def _no_weights(folder):
    (folder / WEIGHTS).unlink()
    return lorakit.AdapterFileError, [str(folder), WEIGHTS]


def _truncated(folder):
    path = folder / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return lorakit.AdapterFileError, [str(path), "truncated"]


def _truncated_by_one_byte(folder):
    path = folder / WEIGHTS
    path.write_bytes(path.read_bytes()[:-1])
    return lorakit.AdapterFileError, [str(path), "truncated"]


def _garbage(folder):
    path = folder / WEIGHTS
    path.write_bytes(bytes(range(256)) * 8)
    return lorakit.AdapterFileError, [str(path)]


def _tiny_garbage(folder):
    path = folder / WEIGHTS
    path.write_bytes(b"oops")
    return lorakit.AdapterFileError, [str(path), "4 bytes"]


def _empty_weights(folder):
    path = folder / WEIGHTS
    path.write_bytes(b"")
    return lorakit.AdapterFileError, [str(path), "0 bytes"]


def _header_longer_than_file(folder):
    path = folder / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) * 10) + data[8:])
    return lorakit.AdapterFileError, [str(path), "header length"]


def _header_not_json(folder):
    path = folder / WEIGHTS
    path.write_bytes(struct.pack("<Q", 6) + b"{oops}" + b"\0" * 16)
    return lorakit.AdapterFileError, [str(path), "header"]


def _tensors(change, *needles, error=lorakit.AdapterFileError):
    def damage(folder):
        path = folder / WEIGHTS
        _rewrite_tensors(path, change)
        return error, [str(path), *needles]
    damage.__name__ = change.__name__
    return damage


def _drop_a_lora_b(tensors):
    del tensors[f"{PREFIX}{V1}.lora_B.weight"]


def _add_an_untargeted_module(tensors):
    tensors[f"{PREFIX}model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)


def _add_a_nonexistent_module(tensors):
    tensors[f"{PREFIX}model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)


def _add_a_magnitude_to_plain_lora(tensors):
    tensors[f"{PREFIX}{Q0}.lora_magnitude_vector"] = torch.ones(32)


def _add_a_full_weight(tensors):
    tensors[f"{PREFIX}lm_head.weight"] = torch.zeros(128, 32)


def _wrong_input_size(tensors):
    tensors[f"{PREFIX}{Q0}.lora_A.weight"] = torch.zeros(4, 64)


def _transposed_b(tensors):
    key = f"{PREFIX}{Q0}.lora_B.weight"
    tensors[key] = tensors[key].T.contiguous()


def _nan(tensors):
    tensors[f"{PREFIX}{Q0}.lora_A.weight"][1, 2] = math.nan


def _inf(tensors):
    tensors[f"{PREFIX}{V1}.lora_B.weight"][0, 0] = -math.inf


def _nan_in_bf16(tensors):
    tensors[f"{PREFIX}{Q0}.lora_B.weight"] = torch.full((32, 4), math.nan, dtype=torch.bfloat16)


def _int_dtype(tensors):
    tensors[f"{PREFIX}{Q0}.lora_A.weight"] = torch.ones(4, 32, dtype=torch.int64)


def _bool_dtype(tensors):
    tensors[f"{PREFIX}{Q0}.lora_A.weight"] = torch.ones(4, 32, dtype=torch.bool)


def _rank_8_config(folder):
    """Config r=8 over tensors of rank 4."""
    _rewrite_config(folder, lambda data: data.update(r=8, lora_alpha=16))
    return lorakit.AdapterFileError, [str(folder / WEIGHTS), f"{PREFIX}{Q0}.lora_A.weight", "(4, 32)", "(8, 32)",
                                      "rank"]


def _dora_config_without_magnitudes(folder):
    _rewrite_config(folder, lambda data: data.update(use_dora=True))
    return lorakit.AdapterFileError, [str(folder / WEIGHTS), "missing", f"{PREFIX}{Q0}.lora_magnitude_vector"]


def _subfolders(folder):
    for sub in ("first_adapter", "second_adapter"):
        (folder / sub).mkdir()
        for name in (CONFIG, WEIGHTS):
            (folder / sub / name).write_bytes((folder / name).read_bytes())
    (folder / CONFIG).unlink()
    (folder / WEIGHTS).unlink()
    return lorakit.AdapterFileError, [str(folder), "several adapters", "first_adapter", "second_adapter"]


DAMAGE = [
    _delete_config, _config_not_json, _config_not_text, _config_a_list,
    _config_field("r", 0, "r must be a positive integer"),
    _config_field("r", 4.0, "r must be a positive integer"),
    _config_field("lora_dropout", -0.1, "lora_dropout"),
    _config_field("lora_alpha", None, "lora_alpha"),
    _config_field("target_modules", [], "target_modules"),
    _config_field("bias", "lora_only", "bias"),
    _config_field("peft_type", "IA3", "peft_type", "IA3"),
    _config_field("lora_bias", True, "lora_bias"),
    _config_field("layers_to_transform", [0], "layers_to_transform"),
    _config_field("use_dora", "yes", "use_dora"),
    _config_without("r"), _config_without("lora_alpha"), _config_without("target_modules"),
    _only_pickle, _no_weights, _truncated, _truncated_by_one_byte, _garbage, _tiny_garbage, _empty_weights,
    _header_longer_than_file, _header_not_json,
    _tensors(_drop_a_lora_b, "missing", f"{PREFIX}{V1}.lora_B.weight"),
    _tensors(_add_an_untargeted_module, "unexpected", f"{PREFIX}model.layers.0.mlp.up_proj.lora_A.weight"),
    _tensors(_add_a_nonexistent_module, f"{PREFIX}model.layers.7.self_attn.q_proj.lora_"),
    _tensors(_add_a_magnitude_to_plain_lora, "unexpected", f"{PREFIX}{Q0}.lora_magnitude_vector"),
    _tensors(_add_a_full_weight, "unexpected", f"{PREFIX}lm_head.weight"),
    _tensors(_wrong_input_size, f"{PREFIX}{Q0}.lora_A.weight", "(4, 64)", "(4, 32)"),
    _tensors(_transposed_b, f"{PREFIX}{Q0}.lora_B.weight", "(4, 32)", "transposed"),
    _tensors(_nan, f"{PREFIX}{Q0}.lora_A.weight", "NaN/Inf"),
    _tensors(_inf, f"{PREFIX}{V1}.lora_B.weight", "NaN/Inf"),
    _tensors(_nan_in_bf16, f"{PREFIX}{Q0}.lora_B.weight", "NaN/Inf"),
    _tensors(_int_dtype, f"{PREFIX}{Q0}.lora_A.weight", "int64", "floating point"),
    _tensors(_bool_dtype, f"{PREFIX}{Q0}.lora_A.weight", "floating point"),
    _rank_8_config, _dora_config_without_magnitudes, _subfolders,
]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda damage: damage.__name__.strip("_"))
def test_load_adapter_rejects_a_damaged_folder_and_changes_nothing(saved, target, damage):
    error, needles = damage(saved)
    model, inputs = target
    snapshot = Snapshot(model, inputs)
    _raises(error, lambda: lorakit.load_adapter(model, saved), *needles)
    snapshot.assert_unchanged()
    assert not (saved.parent / "UNPICKLED").exists()


@pytest.mark.parametrize("damage, key", [
    (_tensors(_drop_a_lora_b), f"{PREFIX}{V1}.lora_B.weight"),
    (_dora_config_without_magnitudes, f"{PREFIX}{Q0}.lora_magnitude_vector"),
], ids=["lora_B", "magnitude"])
def test_a_missing_tensor_is_named_by_its_key(saved, damage, key):
    damage(saved)
    model, _ = BUILDERS["llama"]()
    _raises(lorakit.AdapterFileError, lambda: lorakit.load_adapter(model, saved), f"missing: {key}")


def test_a_pickle_is_never_unpickled(saved, tmp_path):
    marker = tmp_path / "UNPICKLED"
    _only_pickle(saved)
    # The payload is live: unpickling it (as torch.load(weights_only=False) would) creates the marker.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(probe)))
    assert probe.exists()

    model, _ = BUILDERS["llama"]()
    _raises(lorakit.AdapterFileError, lambda: lorakit.load_adapter(model, saved), "pickle")
    pickle_path = saved / "adapter_model.bin"
    _raises(lorakit.AdapterFileError, lambda: read_tensors(pickle_path), str(pickle_path), "pickle")
    assert not marker.exists(), "the .bin file was unpickled"


def test_load_adapter_rejects_a_path_that_is_a_file_or_missing(saved, tmp_path):
    model, inputs = BUILDERS["llama"]()
    snapshot = Snapshot(model, inputs)
    _raises(lorakit.AdapterFileError, lambda: lorakit.load_adapter(model, saved / WEIGHTS), str(saved / WEIGHTS),
            "is a file")
    _raises(lorakit.AdapterFileError, lambda: lorakit.load_adapter(model, tmp_path / "missing" / "folder"),
            str(tmp_path / "missing" / "folder"), "no such")
    empty = tmp_path / "empty"
    empty.mkdir()
    _raises(lorakit.AdapterFileError, lambda: lorakit.load_adapter(model, empty), str(empty), CONFIG)
    snapshot.assert_unchanged()


@pytest.mark.parametrize("name, needle", [("keep", "already attached"), ("bad.name", "no dots")])
def test_load_adapter_rejects_a_taken_or_invalid_name(saved, name, needle):
    model, inputs = _llama_with_adapter("keep")
    snapshot = Snapshot(model, inputs)
    _raises(lorakit.AdapterError, lambda: lorakit.load_adapter(model, saved, name=name), str(saved), repr(name),
            needle)
    snapshot.assert_unchanged()


@pytest.mark.parametrize("source, dest, error, needles", [
    ("gpt2", "llama", lorakit.TargetError, ["c_attn", "matched no module", "LlamaForCausalLM"]),
    ("llama", "vit", lorakit.AdapterFileError, ["unexpected", f"{PREFIX}{Q0}.lora_A.weight", "missing",
                                                f"{PREFIX}vit.layers.0.attention.q_proj"]),
    ("llama", "gpt2", lorakit.TargetError, ["q_proj", "matched no module", "GPT2LMHeadModel"]),
])
def test_load_adapter_rejects_an_adapter_for_another_architecture(tmp_path, source, dest, error, needles):
    trained, _ = BUILDERS[source]()
    targets = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}[source]
    lorakit.add_adapter(trained, lorakit.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    folder = lorakit.save_adapter(trained, tmp_path / source)
    model, inputs = BUILDERS[dest]()
    snapshot = Snapshot(model, inputs)
    _raises(error, lambda: lorakit.load_adapter(model, folder), str(folder), *needles)
    snapshot.assert_unchanged()


def test_load_adapter_rejects_layers_to_transform_zero(saved):
    path = _rewrite_config(saved, lambda data: data.update(layers_to_transform=0))
    model, inputs = BUILDERS["llama"]()
    snapshot = Snapshot(model, inputs)
    try:
        _raises(lorakit.AdapterFileError, lambda: lorakit.load_adapter(model, saved), str(path), "layers_to_transform")
    finally:
        snapshot.assert_unchanged()


def test_load_adapter_rejects_two_tensors_for_the_same_slot(saved):
    def duplicate(tensors):
        tensors[f"{Q0}.lora_A.weight"] = torch.zeros(4, 32)  # the same slot, spelled without the prefix
    _rewrite_tensors(saved / WEIGHTS, duplicate)
    model, inputs = BUILDERS["llama"]()
    snapshot = Snapshot(model, inputs)
    try:
        _raises(lorakit.AdapterFileError, lambda: lorakit.load_adapter(model, saved), f"{Q0}.lora_A.weight")
    finally:
        snapshot.assert_unchanged()


def test_a_float8_tensor_is_checked_and_loaded_widened(saved):
    """float8 has no isfinite kernel; the check widens it instead of crashing, and the load keeps its values."""
    key = f"{PREFIX}{Q0}.lora_A.weight"

    def to_fp8(tensors):
        tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    _rewrite_tensors(saved / WEIGHTS, to_fp8)
    model, _ = BUILDERS["llama"]()
    lorakit.load_adapter(model, saved)
    expected = load_file(saved / WEIGHTS)[key].float()
    assert torch.equal(model.get_submodule(Q0).lora_A["default"], expected)


@pytest.mark.parametrize("offsets", [[0], None, 7], ids=["one_offset", "null", "int"])
def test_load_adapter_rejects_malformed_data_offsets(saved, offsets):
    path = saved / WEIGHTS
    path.write_bytes(_raw_safetensors({f"{PREFIX}{Q0}.lora_A.weight": {"dtype": "F32", "shape": [1],
                                                                      "data_offsets": offsets}}, b"\0" * 4))
    model, inputs = BUILDERS["llama"]()
    snapshot = Snapshot(model, inputs)
    try:
        _raises(lorakit.AdapterFileError, lambda: lorakit.load_adapter(model, saved), str(path))
    finally:
        snapshot.assert_unchanged()


def test_load_adapter_rejects_a_header_describing_more_data_than_the_file(saved):
    path = saved / WEIGHTS
    path.write_bytes(_raw_safetensors({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 4))
    model, inputs = BUILDERS["llama"]()
    snapshot = Snapshot(model, inputs)
    _raises(lorakit.AdapterFileError, lambda: lorakit.load_adapter(model, saved), str(path), "16 bytes", "holds 4")
    snapshot.assert_unchanged()


def test_an_unconverted_pissa_adapter_is_refused_or_round_trips(saved, tmp_path):
    _rewrite_config(saved, lambda data: data.update(init_lora_weights="pissa"))
    model, _ = BUILDERS["llama"]()
    try:
        lorakit.load_adapter(model, saved)
    except lorakit.LorakitError as exc:
        assert "init_lora_weights" in str(exc)
        return
    again = lorakit.save_adapter(model, tmp_path / "again")
    lorakit.load_adapter(BUILDERS["llama"]()[0], again)


# --- save_adapter ------------------------------------------------------------------------------------
def test_save_adapter_refuses_nan_weights_and_keeps_the_previous_files(tmp_path):
    model, inputs = BUILDERS["llama"]()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    folder = lorakit.save_adapter(model, tmp_path / "adapter")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert set(before) == {CONFIG, WEIGHTS}

    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_B["default"][3, 1] = math.nan
    _raises(lorakit.AdapterFileError, lambda: lorakit.save_adapter(model, folder),
            str(folder / WEIGHTS), f"{PREFIX}{V1}.lora_B.weight", "NaN/Inf")
    after = {path.name: path.read_bytes() for path in folder.iterdir()}  # also: no temporary files left
    assert after == before
    assert lorakit.load_adapter(BUILDERS["llama"]()[0], folder) == "default", "the old adapter still loads"


def test_save_adapter_refuses_a_path_that_is_a_file(tmp_path):
    model, _ = _llama_with_adapter("default")
    path = tmp_path / "not_a_folder"
    path.write_bytes(b"keep me")
    _raises(lorakit.AdapterFileError, lambda: lorakit.save_adapter(model, path), str(path), "not a folder")
    assert path.read_bytes() == b"keep me"


# --- merge_adapter -----------------------------------------------------------------------------------
@pytest.mark.parametrize("where", [
    "first",
    "last",
])
def test_merge_adapter_refuses_inf_weights_and_leaves_the_base_unchanged(where):
    model, inputs = BUILDERS["llama"]()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    attention = model.model.layers[0 if where == "first" else 1].self_attn
    layer = attention.q_proj if where == "first" else attention.v_proj  # the first / last layer merged
    with torch.no_grad():
        layer.lora_B["default"][0, 0] = math.inf
    base = {name: p.detach().clone() for name, p in model.named_parameters() if "base_layer" in name}
    _raises(lorakit.AdapterError, lambda: lorakit.merge_adapter(model, "default"), "'default'", "NaN/Inf",
            "nothing merged")
    for name, param in model.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), f"{name} changed by a refused merge"
    assert all(not m.merged_adapters for m in model.modules() if isinstance(m, LoraLayer))


# --- unknown adapter names ---------------------------------------------------------------------------
OPERATIONS = {
    "set_adapter": lambda model, tmp: lorakit.set_adapter(model, "gamma"),
    "merge_adapter": lambda model, tmp: lorakit.merge_adapter(model, "gamma"),
    "delete_adapter": lambda model, tmp: lorakit.delete_adapter(model, "gamma"),
    "save_adapter": lambda model, tmp: lorakit.save_adapter(model, tmp / "out", "gamma"),
}


@pytest.mark.parametrize("operation", OPERATIONS)
def test_operations_on_an_unknown_adapter_list_the_known_ones(operation, tmp_path):
    model, inputs = BUILDERS["llama"]()
    for name, targets in (("alpha", ["q_proj"]), ("beta", ["v_proj"])):
        lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=targets, init_lora_weights=False), name)
    lorakit.set_adapter(model, "alpha")
    snapshot = Snapshot(model, inputs)
    _raises(lorakit.AdapterError, lambda: OPERATIONS[operation](model, tmp_path), "'gamma'", "'alpha'", "'beta'")
    snapshot.assert_unchanged()
    assert not (tmp_path / "out").exists(), "save_adapter created a folder for an unknown adapter"


@pytest.mark.parametrize("operation", OPERATIONS)
def test_operations_on_a_model_without_adapters_say_so(operation, tmp_path):
    model, inputs = BUILDERS["llama"]()
    snapshot = Snapshot(model, inputs)
    _raises(lorakit.AdapterError, lambda: OPERATIONS[operation](model, tmp_path), "LlamaForCausalLM",
            "no lorakit adapter")
    snapshot.assert_unchanged()
    assert not (tmp_path / "out").exists()
    assert not os.listdir(tmp_path)
