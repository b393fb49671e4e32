"""The README's example runs as written, and CI runs the README's own commands."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(tag: str, language: str) -> str:
    match = re.search(rf"<!-- {tag} -->\n```{language}\n(.*?)```", README, re.S)
    assert match, f"README.md has no ```{language} block after <!-- {tag} -->"
    return match.group(1)


def test_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_block_after("example", "python"), "README.md example", "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()


def test_ci_runs_the_readme_commands():
    """.ci/run extracts exactly the README's setup and test commands."""
    for tag in ("setup", "test"):
        out = subprocess.run(["bash", ".ci/run", "--print", tag], cwd=ROOT, capture_output=True, text=True, check=True)
        assert out.stdout == _block_after(tag, "bash")
