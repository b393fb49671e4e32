"""The README's example runs as written, and CI runs the README's own commands."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import signal
import subprocess
import sys
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


def test_the_readme_serve_line_serves_the_example_adapters_to_the_openai_client():
    """The README's one `lorakit serve` line, then its client snippet as written (only the port differs)."""
    command = shlex.split(_block_after("serve", "bash"))
    assert command[0] == ".venv/bin/lorakit" and command[1] == "serve"
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", *command[1:], "--port", "0", "--dtype", "fp32"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline()
        assert "3 adapter(s) at http://" in ready, proc.stderr.read()
        url = ready.split(" at ")[1].strip()
        client = _block_after("serve-client", "python").replace("http://127.0.0.1:8000/v1", url)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(client, "README.md serve-client", "exec"), {"__name__": "__readme__"})
        lines = printed.getvalue().splitlines()
        assert lines[0] == "['lorakit-embedded', 'reverse', 'json', 'count', 'auto']"
        assert lines[1].startswith(" sword night king ")
        assert lines[2] == '{"name": "peter", "work": "nurse"}'
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
