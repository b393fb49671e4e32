"""The `lorakit` command.

    lorakit train [CONFIG.yaml] [--flags]        fine-tune an adapter (defaults: embedded model, example skill)
    lorakit generate [--model M] [--adapter DIR | --adapter auto --candidate NAME=DIR ...] PROMPT
    lorakit eval [--model M] [--adapter DIR] --data FILE [--task NAME]   (results kept for the leaderboard)
    lorakit leaderboard [--task NAME] [--json]   adapter versions ranked per task and by playground votes
    lorakit merge [--model M] --adapter DIR --output DIR
    lorakit compose --adapter NAME=DIR:WEIGHT ... [--method linear|cat|svd|ties|...] --output DIR
    lorakit skills [NAME] --output DIR           write an example skill's train/held-out files
    lorakit inspect DIR [--json]                 check an adapter folder and say what it holds
    lorakit push DIR OWNER/NAME                  upload an adapter folder (and its model card) to the hub
    lorakit serve [--adapter NAME=DIR ...]       serve the base model and adapters over OpenAI's HTTP API
    lorakit route-index DIR --data FILE          give an adapter a routing signature (model "auto")
    lorakit estimate [--model M] [--method full|lora|qlora] [--device-memory 24GB] ...
                                                 parameters, adapter size and memory, from a config alone
    lorakit completion bash|zsh                  a shell completion script (`source <(lorakit completion bash)`)
    lorakit --version

Every subcommand and flag: docs/cli.md (`lorakit SUBCOMMAND --help` says the same).

A user's mistake (a bad path, a corrupt file, an impossible setting) prints one clear line and exits with
status 2; it never ends in a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from lorakit.errors import LorakitError


def build_parser() -> argparse.ArgumentParser:
    from lorakit.cli import (completion, compose, estimate, generate, inspect, leaderboard, merge, push, registry,
                             route_index, serve, sign, skills, train, vet)

    parser = argparse.ArgumentParser(prog="lorakit", description="Train, check, store and serve LoRA adapters.")
    parser.add_argument("--version", action="version", version=f"lorakit {installed_version()}",
                        help="print lorakit's version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="what to do; `lorakit COMMAND --help` lists its flags")
    for module in (train, generate, leaderboard, merge, compose, skills, inspect, serve, route_index, estimate,
                   completion, push, registry, sign, vet):
        module.register(commands)
    return parser


def installed_version() -> str:
    """The version of the installed lorakit package, from its metadata (what pip installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorakit")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _quiet_libraries() -> None:
    """transformers' own loading bars and advice would bury lorakit's output; its errors still show."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _refuse_unknown(parser, args.command, unknown)
    if args.command != "inspect":
        _quiet_libraries()
    try:
        return args.run(args)
    except LorakitError as exc:
        print(f"lorakit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`lorakit ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141


def _refuse_unknown(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> None:
    """argparse's "unrecognized arguments" (usage, one line, status 2), with the closest flag suggested."""
    import difflib

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = [flag for action in sub._actions for flag in action.option_strings]
    hints = []
    for word in unknown:
        close = difflib.get_close_matches(word.split("=", 1)[0], flags, n=1) if word.startswith("--") else []
        if close:
            hints.append(f"{word.split('=', 1)[0]}: did you mean {close[0]}?")
    sub.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else ""))


if __name__ == "__main__":
    sys.exit(main())
