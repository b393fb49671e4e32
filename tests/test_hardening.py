"""What a hostile or broken input cannot do: stall a process with a regex, plant a compiled kernel, steer a
resume outside its run or crash it with a crafted state file, load a pickle base model unasked, or install a
dependency release with a known code-execution bug.

Processes that could hang or print a traceback run as real subprocesses, with generous timeouts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.cli import build_parser
from lorakit.core.targets import name_matches
from lorakit.engine import Engine, EngineConfig
from lorakit.engine import lora_kernel
from lorakit.errors import ConfigError, ModelError, TrainError
from lorakit.models import load_model
from lorakit.train import checkpoint as ckpt
from tiny_models import tiny_chat_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def run_python(script: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], env=dict(os.environ, **env), capture_output=True,
                          text=True, timeout=timeout)


def lorakit_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _save_tiny_llama(folder: Path, pickle: bool) -> Path:
    tokenizer = tiny_chat_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    if pickle:
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-model"), pickle=False)


# --- 1. module-name patterns run in linear time -------------------------------------------------------
def test_catastrophic_patterns_finish_at_once_on_long_names():
    """With backtracking `re`, each of these calls takes minutes; RE2 answers in microseconds."""
    script = (
        "from lorakit import LoraConfig\n"
        "from lorakit.core.targets import name_matches\n"
        "config = LoraConfig(r=8, target_modules='(a+)+b', exclude_modules='(.|.)*Z',\n"
        "                    rank_pattern={'(.|.)*Z': 4, '(a+)+$': 2}, alpha_pattern={'(x+x+)+y': 3.0})\n"
        "name = 'a' * 50000 + '!'\n"
        "print(config.rank_for(name), config.alpha_for('x' * 50000), name_matches('(a+)+b', name),\n"
        "      name_matches('(.|.)*Z', 'layers.' * 10000 + 'q_proj'))\n")
    out = run_python(script, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["8", "8", "False", "False"]


def test_patterns_keep_peft_semantics():
    config = lorakit.LoraConfig(r=8, lora_alpha=8, rank_pattern={"q_proj": 2, r"layers\.1\.mlp\..*": 4},
                                alpha_pattern={"v_proj|o_proj": 32})
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert config.rank_for("q_proj") == 2
    assert config.rank_for("model.layers.0.self_attn.xq_proj") == 8  # the key matches at a dot boundary only
    assert config.rank_for("model.layers.1.mlp.down_proj") == 4
    assert config.rank_for("model.layers.0.self_attn.q_proj.base") == 8  # ... and at the end of the name
    assert config.alpha_for("model.layers.3.self_attn.o_proj") == 32
    assert name_matches(r".*\.(q|v)_proj", "model.layers.0.self_attn.q_proj")
    assert not name_matches("q_proj", "model.layers.0.self_attn.q_proj")  # a string must match the whole name


@pytest.mark.parametrize("field, value, where", [
    ("rank_pattern", {"(?=q)q_proj": 4}, "rank_pattern key '(?=q)q_proj'"),
    ("alpha_pattern", {r"(q)_proj\1": 4.0}, r"alpha_pattern key '(q)_proj\\1'"),
    ("target_modules", r".*(?<!lm)_proj", "target_modules="),
    ("exclude_modules", r"(?!x).*", "exclude_modules="),
])
def test_lookarounds_and_backreferences_are_refused_by_name(field, value, where):
    with pytest.raises(ConfigError) as caught:
        lorakit.LoraConfig(**{field: value})
    message = str(caught.value)
    assert where in message and "lookarounds" in message and "backreferences" in message
    assert "\n" not in message


# --- 2. the compiled-kernel cache ---------------------------------------------------------------------
ENGINE_PATH = ("from lorakit.engine import Engine, EngineConfig\n"
               "print(Engine(EngineConfig(max_running=2, max_model_len=64)).slots.path)\n")


def test_a_world_writable_kernel_cache_is_refused_and_the_engine_serves_on_the_reference_path(tmp_path):
    cache = tmp_path / "shared-cache"
    cache.mkdir()
    cache.chmod(0o777)
    out = run_python(ENGINE_PATH, LORAKIT_CACHE=str(cache), LORAKIT_CPU_KERNEL="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "batched-products"
    assert f"{cache} can be written by other users" in out.stderr and f"chmod go-w {cache}" in out.stderr
    assert "Traceback" not in out.stderr
    assert not list(cache.rglob("*.so"))


@pytest.mark.skipif(os.getuid() != 0, reason="only root can make a folder that belongs to another user")
def test_a_kernel_cache_of_another_user_is_refused(tmp_path):
    cache = tmp_path / "theirs"
    cache.mkdir(mode=0o700)
    os.chown(cache, 65534, 65534)
    out = run_python(ENGINE_PATH, LORAKIT_CACHE=str(cache), LORAKIT_CPU_KERNEL="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "batched-products"
    assert f"{cache} belongs to another user" in out.stderr and "chown" in out.stderr


def test_the_kernel_cache_folders_are_created_private(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "fresh"))
    build_dir = lora_kernel._trusted_build_dir()
    for folder in (tmp_path / "fresh", tmp_path / "fresh" / "kernels", build_dir):
        assert folder.stat().st_mode & 0o777 == 0o700


def test_a_stale_build_lock_gives_up_within_the_timeout(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORAKIT_CACHE", str(cache))
    build_dir = lora_kernel.kernel_build_dir()
    build_dir.mkdir(parents=True, mode=0o700)
    (build_dir / "lock").touch()  # left by a build that was killed
    out = run_python(ENGINE_PATH, timeout=120, LORAKIT_CACHE=str(cache), LORAKIT_CPU_KERNEL="1",
                     LORAKIT_KERNEL_LOCK_TIMEOUT="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "batched-products"
    assert f"{build_dir / 'lock'} is still held after 1 s" in out.stderr
    assert f"delete {build_dir / 'lock'}" in out.stderr


# --- 3. checkpoints -----------------------------------------------------------------------------------
def _run_parts(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def _save(folder: Path, step: int, keep: int = 2) -> Path:
    model, optimizer, scheduler = _run_parts()
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return ckpt.save_checkpoint(folder, model=model, optimizer=optimizer, scheduler=scheduler,
                                position=ckpt.Position(step=step), save_adapter_to=lambda path: path.mkdir(),
                                keep=keep)


def _load(path: Path) -> ckpt.Position:
    model, optimizer, scheduler = _run_parts(seed=1)
    return ckpt.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)


def test_a_checkpoint_round_trips(tmp_path):
    saved = _save(tmp_path / "checkpoints", step=7)
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") == saved.resolve()
    assert _load(saved).step == 7


def test_latest_json_pointing_outside_the_run_is_refused(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    _save(folder, step=3)
    elsewhere = _save(tmp_path / "other" / "checkpoints", step=5)
    for target in (str(elsewhere), "../../other/checkpoints/step-000005", "."):
        (folder / "latest.json").write_text(json.dumps({"step": 5, "path": target}))
        with pytest.raises(TrainError, match="outside"):
            ckpt.latest_checkpoint(folder)
    (folder / "step-000005").symlink_to(elsewhere)  # inside by name, outside once the link is followed
    (folder / "latest.json").write_text(json.dumps({"step": 5, "path": "step-000005"}))
    with pytest.raises(TrainError, match="outside"):
        ckpt.latest_checkpoint(folder)


@pytest.mark.parametrize("text", [
    "not json {",
    "[" * 100_000,                                   # RecursionError inside json
    "[1, 2]",
    json.dumps({"position": {"step": 3}}),           # missing keys
])
def test_a_corrupt_state_json_is_one_clear_error(tmp_path, text):
    saved = _save(tmp_path / "checkpoints", step=3)
    (saved / "state.json").write_text(text)
    with pytest.raises(TrainError) as caught:
        _load(saved)
    assert str(saved / "state.json") in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("change", [
    lambda state: state["position"].update(step="3"),
    lambda state: state["position"].update(extra=1),
    lambda state: state["scheduler"].update(optimizer=5),  # would otherwise be set on the live scheduler
    lambda state: state["scheduler"].update(last_epoch=[1]),
    lambda state: state["optimizer"]["param_groups"][0].update(lr="fast"),
    lambda state: state["optimizer"].update(param_groups=[]),
    lambda state: state.update(python_random=[3, "abc", None]),
    lambda state: state.update(python_random=[3]),
])
def test_a_crafted_state_json_is_refused_before_use(tmp_path, change):
    saved = _save(tmp_path / "checkpoints", step=3)
    state = json.loads((saved / "state.json").read_text())
    change(state)
    (saved / "state.json").write_text(json.dumps(state))
    with pytest.raises(TrainError, match="state.json"):
        _load(saved)


def test_resuming_from_a_crafted_state_json_ends_in_one_line(tiny_model, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--model", tiny_model, "--output", run, "--batch-size", 2, "--max-length", 32,
            "--max-steps", 1, "--eval-steps", 100, "--eval-samples", 0, "--save-steps", 1, "--no-progress"]
    first = lorakit_cli(*args)
    assert first.returncode == 0, first.stderr
    state = run / "checkpoints" / "step-000001" / "state.json"
    state.write_text("[" * 100_000)
    resumed = lorakit_cli(*args, "--resume")
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr
    assert resumed.stderr.strip().count("\n") == 0 and str(state) in resumed.stderr


def test_pruning_keeps_the_newest_steps_past_a_million(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        _save(folder, step, keep=2)
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-1000000", "step-1000001"]
    (folder / "step-notes").mkdir()  # a folder lorakit did not name is left alone
    _save(folder, 1_000_002, keep=2)
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-1000001", "step-1000002", "step-notes"]


# --- 4. dependency floors -----------------------------------------------------------------------------
def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {Requirement(line).name.lower(): Requirement(line) for line in project["dependencies"]}


def test_dependency_floors_exclude_releases_with_known_code_execution_bugs():
    requirements = _requirements()
    torch_spec = requirements["torch"].specifier
    assert "2.13.0" in torch_spec and "2.10.0" in torch_spec
    assert not any(v in torch_spec for v in ("2.5.1", "2.6.0", "2.9.1", "2.14.0"))
    assert "14.0.0" not in requirements["pyarrow"].specifier
    assert "4.47.0" not in requirements["transformers"].specifier
    assert "3.1.5" not in requirements["jinja2"].specifier


def test_the_installed_packages_satisfy_the_floors():
    for name, requirement in _requirements().items():
        installed = metadata.version(name).split("+")[0]
        assert installed in requirement.specifier, f"{name} {installed} does not satisfy {requirement}"


# --- 5. pickle base models ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pickle_model(tmp_path_factory) -> Path:
    """A tiny Llama folder as older tools wrote it: config, tokenizer, and pytorch_model.bin only."""
    return _save_tiny_llama(tmp_path_factory.mktemp("pickle-model"), pickle=True)


def test_generate_refuses_a_pickle_model_unless_trusted(pickle_model):
    refused = lorakit_cli("generate", "--model", pickle_model, "--max-new-tokens", 2, "hi")
    assert refused.returncode == 2
    assert "--trust-pickle" in refused.stderr and "pytorch_model.bin" in refused.stderr
    assert "arbitrary code" in refused.stderr and "Traceback" not in refused.stderr
    trusted = lorakit_cli("generate", "--model", pickle_model, "--trust-pickle", "--max-new-tokens", 2, "hi")
    assert trusted.returncode == 0, trusted.stderr


def test_train_refuses_a_pickle_model_and_records_the_setting(pickle_model, tmp_path):
    refused = lorakit_cli("train", "--model", pickle_model, "--max-steps", 1, "--output", tmp_path / "run",
                          "--no-progress")
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr and "Traceback" not in refused.stderr
    shown = lorakit_cli("train", "--model", pickle_model, "--trust-pickle", "--print-config")
    assert json.loads(shown.stdout)["trust_pickle"] is True


def test_every_command_that_loads_a_model_takes_trust_pickle(pickle_model):
    parser = build_parser()
    for command in (["generate", "hi"], ["eval", "--data", "x.jsonl"], ["merge", "--adapter", "a", "--output", "o"],
                    ["serve"], ["train"]):
        assert parser.parse_args([command[0], "--trust-pickle", *command[1:]]).trust_pickle is True
    with pytest.raises(ModelError, match="--trust-pickle"):
        Engine(EngineConfig(model=str(pickle_model), max_running=1, max_model_len=32))
    engine = Engine(EngineConfig(model=str(pickle_model), max_running=1, max_model_len=32, trust_pickle=True))
    assert engine.model_name == pickle_model.name


def test_a_pickle_model_loads_to_the_same_weights_when_trusted(pickle_model):
    with pytest.raises(ModelError, match="arbitrary code"):
        load_model(str(pickle_model))
    model = load_model(str(pickle_model), trust_pickle=True)
    saved = torch.load(pickle_model / "pytorch_model.bin", weights_only=True)
    assert torch.equal(model.model.embed_tokens.weight, saved["model.embed_tokens.weight"])
