"""The command line a user expects: help for every flag, the fixed values listed, `--version`, shell
completion that really completes in bash and zsh, a hint before reading a prompt typed at a terminal, and
docs/cli.md equal to the parser. Every check walks the parser, so subcommands added later are covered."""

from __future__ import annotations

import importlib.metadata
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit.cli import build_parser
from lorakit.cli.completion import script
from lorakit.cli.introspect import options, subcommands
from lorakit.cli.reference import BEGIN, with_reference
from lorakit.cli.train import CHOICES, HELP
from lorakit.train import config as train_config

ROOT = Path(__file__).resolve().parents[1]
# Flags whose help their file's owner is adding (src/lorakit/cli/merge.py is being edited elsewhere).
def _lorakit(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit.cli", *args], capture_output=True, text=True, timeout=120,
                          **kwargs)


def test_every_argument_of_every_subcommand_has_help():
    parser = build_parser()
    commands = subcommands(parser)
    assert len(commands) >= 9 and {"train", "generate", "eval", "completion"} <= {c.name for c in commands}
    missing = [(c.name, o.name) for c in commands for o in c.options
               if not o.help.strip()]
    missing += [("lorakit", o.name) for o in options(parser) if not o.help.strip()]
    assert missing == [], f"arguments without a help text: {missing}"
    assert all(c.help for c in commands), "a subcommand without a one-line summary in `lorakit --help`"


def test_train_flags_explain_every_setting_and_list_the_fixed_values():
    assert set(HELP) == set(train_config.FIELDS), "every TrainConfig field needs a HELP text in cli/train.py"
    train = next(c for c in subcommands(build_parser()) if c.name == "train")
    flags = {o.flags[0]: o for o in train.options if o.flags}
    for name, values in [("--schedule", train_config.SCHEDULES), ("--precision", train_config.PRECISIONS),
                         ("--on-overflow", train_config.OVERFLOW), ("--quantize", train_config.QUANTIZE),
                         ("--quantize-backend", train_config.QUANTIZE_BACKENDS),
                         ("--report-to", train_config.REPORT_TO)]:
        assert flags[name].choices == values
        assert "{" + ",".join(values) + "}" in flags[name].invocation   # what `--help` prints
    assert "(default: cosine)" in flags["--schedule"].help and "(default: off)" in flags["--use-dora"].help
    assert set(CHOICES) <= set(train_config.FIELDS)


def test_report_to_choices_take_comma_separated_trackers():
    choices = CHOICES["report_to"]
    assert "wandb,mlflow" in choices and "tensorboard, wandb" in choices
    assert "wandb,comet" not in choices and "" not in choices


def test_version_is_the_installed_package_version():
    result = _lorakit("--version")
    assert result.returncode == 0 and result.stdout == f"lorakit {importlib.metadata.version('lorakit')}\n"


# -- bash ----------------------------------------------------------------------------------------------------
def _bash_complete(script_file: Path, words: list[str], cwd: Path) -> list[str]:
    """COMPREPLY of `_lorakit` for the command line `words` (the last one being completed)."""
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    program = (f"source {script_file}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _lorakit\n"
               'printf "%s\\n" "${COMPREPLY[@]}"')
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True, text=True,
                            cwd=cwd, timeout=30)
    assert result.returncode == 0, result.stderr
    return sorted(line for line in result.stdout.splitlines() if line)


def test_bash_completion_completes_subcommands_flags_values_and_files(tmp_path):
    script_file = tmp_path / "lorakit.bash"
    script_file.write_text(_lorakit("completion", "bash").stdout)
    (tmp_path / "rows.jsonl").write_text("{}\n")
    (tmp_path / "runs").mkdir()

    def complete(*words):
        return _bash_complete(script_file, ["lorakit", *words], tmp_path)

    assert complete("tr") == ["train"]
    assert complete("train", "--sch") == ["--schedule"]
    assert complete("train", "--schedule", "") == ["constant", "cosine", "linear"]
    assert complete("train", "--schedule", "=", "co") == ["constant", "cosine"]      # --schedule=co
    assert complete("train", "--report-to", "") == ["mlflow", "none", "tensorboard", "wandb"]
    assert complete("train", "--data", "r") == ["rows.jsonl", "runs"]
    assert complete("train", "--lr", "") == []                                        # a number: nothing
    assert complete("train", "run.yaml", "--max-st") == ["--max-steps"]
    assert complete("completion", "") == ["bash", "zsh"]
    assert complete("--vers") == ["--version"]
    # every flag of every subcommand, as the parser has them
    for command in subcommands(build_parser()):
        flags = sorted(f for o in command.options for f in o.flags if f.startswith("--"))
        assert complete(*command.name.split(), "--") == flags, command.name
    registered = subprocess.run(["bash", "-c", f"source {script_file}; complete -p lorakit"], capture_output=True,
                                text=True)
    assert registered.stdout.strip() == "complete -F _lorakit lorakit"


# -- zsh -----------------------------------------------------------------------------------------------------
def test_zsh_completion_script_covers_the_parser_and_completes_in_zsh(tmp_path):
    text = script("zsh", build_parser())
    assert text.startswith("#compdef lorakit\n")
    # structure: one _arguments branch per subcommand, holding a spec for each flag, with its fixed values
    for command in subcommands(build_parser()):
        label = command.name.split(" ")[-1]          # an action's branch sits inside its command's
        branch = re.search(rf"^ +{label}\)\n(?: +shift words; \(\( CURRENT-- \)\)\n| +if \(\( CURRENT > 2 \)\); "
                           r"then\n.*?\n +else\n)? +_arguments \\\n(.*?) && ret=0(?: ;;)?$", text, re.M | re.S)
        assert branch, command.name
        for option in command.options:
            for flag in option.flags:
                spec = re.search(rf"^ +'\*?{re.escape(flag)}(=?)\[[^\n]*\]([^\n]*)'( \\)?$", branch.group(1), re.M)
                assert spec, f"{command.name} {flag}"
                assert (spec.group(1) == "=") == option.takes_value
                if option.choices:
                    assert spec.group(2).endswith(f":({' '.join(option.choices)})"), f"{command.name} {flag}"
    assert "'train:fine-tune an adapter'" in text

    if shutil.which("zsh") is None:   # CI machines may lack zsh: the structure above is what is checked there
        return
    script_file = tmp_path / "_lorakit"
    script_file.write_text(text)
    checked = subprocess.run(["zsh", "-n", str(script_file)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    shell = _ZshAtATerminal(tmp_path)
    try:
        shell.run(f"autoload -Uz compinit && compinit -u -D && source {script_file}")
        assert "lorakit train " in shell.type("lorakit tr\t", "lorakit train ")
        assert "--schedule=" in shell.type("--sch\t", "--schedule=")
    finally:
        shell.close()


class _ZshAtATerminal:
    """An interactive `zsh -f` on a pseudo-terminal, where TAB runs real completion."""

    def __init__(self, home: Path) -> None:
        self.master, slave = pty.openpty()
        env = {"PATH": os.environ["PATH"], "TERM": "dumb", "HOME": str(home)}
        self.process = subprocess.Popen(["zsh", "-f", "-i"], stdin=slave, stdout=slave, stderr=slave, env=env,
                                        start_new_session=True)
        os.close(slave)

    def run(self, command: str) -> None:
        os.write(self.master, f"{command}; print -r -- DONE$((6*7))\n".encode())
        self._read_until("DONE42")

    def type(self, keys: str, expected: str) -> str:
        os.write(self.master, keys.encode())
        return self._read_until(expected)

    def _read_until(self, text: str, timeout: float = 15) -> str:
        seen, deadline = b"", time.monotonic() + timeout
        while text.encode() not in seen and time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.1)[0]:
                seen += os.read(self.master, 4096)
        return seen.decode(errors="replace")

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self.master)


# -- generate's prompt ----------------------------------------------------------------------------------------
HINT = "reading the prompt from standard input; end it with Ctrl-D (or pass it as an argument)"


def test_generate_without_a_prompt_at_a_terminal_says_it_reads_standard_input():
    master, slave = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "generate"], stdin=slave,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(slave)
    try:
        hint = b""
        deadline = time.monotonic() + 120
        while (HINT + "\n").encode() not in hint and time.monotonic() < deadline and process.poll() is None:
            if select.select([process.stderr], [], [], 0.5)[0]:
                hint += os.read(process.stderr.fileno(), 4096)
        assert hint.decode() == f"lorakit generate: {HINT}\n"   # before it waits, and on stderr
        os.write(master, b"\x04")                                 # Ctrl-D at once: an empty prompt
        _, rest = process.communicate(timeout=60)
    finally:
        process.kill()
        os.close(master)
    assert process.returncode == 2 and "the prompt is empty" in rest.decode()


def test_generate_reading_a_piped_prompt_gives_no_hint():
    result = _lorakit("generate", input="   \n")
    assert result.returncode == 2 and HINT not in result.stderr
    assert result.stderr == ("lorakit generate: error: the prompt is empty; pass it as an argument or on standard "
                             "input\n")


# -- docs/cli.md ----------------------------------------------------------------------------------------------
def test_docs_cli_page_lists_every_subcommand_and_flag_as_the_parser_has_them():
    page = (ROOT / "docs" / "cli.md").read_text()
    assert BEGIN in page
    assert page == with_reference(page, build_parser()), (
        "docs/cli.md is out of date with the flags: run `python -m lorakit.cli.reference docs/cli.md`")
    for command in subcommands(build_parser()):
        assert f"### `lorakit {command.name}`" in page
    assert "lorakit --version" in page and "lorakit completion bash" in page and "--report-to" in page


def test_help_of_every_subcommand_prints(capsys):
    parser = build_parser()
    for command in subcommands(parser):
        with pytest.raises(SystemExit) as done:
            parser.parse_args([*command.name.split(), "--help"])
        assert done.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: lorakit {command.name}")
