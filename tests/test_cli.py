"""The `lorakit` command, run as a real subprocess, and the package's import boundaries."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import lorakit
from tiny_models import llama


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit.cli", *args], capture_output=True, text=True, timeout=120)


def _saved_adapter(folder, **config):
    model, _ = llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(**config))
    lorakit.save_adapter(model, folder)
    return folder


def test_inspect_describes_an_adapter(tmp_path):
    folder = _saved_adapter(tmp_path / "a", r=16, lora_alpha=32, target_modules="all-linear")
    result = _run("inspect", str(folder))
    assert result.returncode == 0, result.stderr
    assert "rank 16" in result.stdout and "14 modules" in result.stdout and "vLLM: loads as is" in result.stdout

    info = json.loads(_run("inspect", str(folder), "--json").stdout)
    assert info["r"] == 16 and info["adapted_modules"] == 14 and info["vllm_compatible"] is True
    assert info["vllm_max_lora_rank"] == 16
    assert info["parameters"] == 16 * 2 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))


def test_inspect_says_why_vllm_would_refuse_a_dora_adapter(tmp_path):
    folder = _saved_adapter(tmp_path / "d", r=4, target_modules=["q_proj"], use_dora=True)
    result = _run("inspect", str(folder))
    assert result.returncode == 0 and "DoRA" in result.stdout and "r=4" not in result.stdout


def test_inspect_reports_a_bad_folder_in_one_line_without_a_traceback(tmp_path):
    folder = _saved_adapter(tmp_path / "bad", target_modules=["q_proj"])
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for target in (folder, tmp_path / "missing"):
        result = _run("inspect", str(target))
        assert result.returncode == 2
        assert "Traceback" not in result.stderr and result.stderr.startswith("lorakit inspect: error:")
        assert str(target) in result.stderr


def test_lorakit_never_imports_peft_or_transformers():
    code = "import sys, lorakit; print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_core_depends_on_torch_alone():
    """torch, and RE2 for matching user-supplied module-name patterns in linear time (core/patterns.py)."""
    core = Path(lorakit.__file__).parent / "core"
    for path in core.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                allowed = top in ("torch", "re2", "__future__", "lorakit") or top in sys.stdlib_module_names
                assert allowed and not name.startswith("lorakit.io"), f"{path.name} imports {name}"
                assert not name.startswith("lorakit.") or name.startswith(("lorakit.core", "lorakit.errors")), name
