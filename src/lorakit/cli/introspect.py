"""The `lorakit` parser read back: its subcommands, their options, and what each option's value is.

One walk over argparse's own objects, so that the shell completion scripts (`lorakit completion`), the
CLI reference (docs/cli.md, written by scripts/cli_reference.py) and the tests see the flags exactly as
they are defined, and a subcommand or flag added later shows up in all of them by itself.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """One argument of a (sub)command: a flag, or a positional when `flags` is empty."""

    flags: tuple[str, ...]      # ("--schedule",), ("--chat", "--no-chat"), ("-h", "--help"); () for a positional
    name: str                   # "-h, --help"; a positional's name
    invocation: str             # as `--help` lists it: "--schedule {cosine,linear,constant}", "--lr LR"
    help: str                   # %(default)s and friends expanded; "" when the option has none
    takes_value: bool           # False for switches (store_true, --x/--no-x, --help, --version)
    choices: tuple[str, ...]    # the fixed values it takes, () when it takes any
    completes_files: bool       # a free-text value (most are paths): shells offer file names
    repeatable: bool            # may be given again to add a value (`--adapter A --adapter B`)
    required: bool              # a positional that must be given


@dataclass(frozen=True)
class Command:
    """A subcommand: `lorakit NAME ...`."""

    name: str
    help: str                   # the one-line summary `lorakit --help` shows
    description: str            # the longer text of `lorakit NAME --help` ("" when none)
    options: tuple[Option, ...]  # flags first, then positionals, each in definition order


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> list[Command]:
    """Every subcommand of `parser`, in the order `lorakit --help` lists them; a subcommand with actions of
    its own (`lorakit registry add|list|...`) is followed by them, named "registry add" and so on."""
    action = _subparsers(parser)
    summaries = {choice.dest: choice.help or "" for choice in action._choices_actions}
    found = []
    for name, sub in action.choices.items():
        found.append(Command(prefix + name, summaries.get(name, ""), sub.description or "", tuple(options(sub))))
        if _subparsers(sub) is not None:
            found += subcommands(sub, prefix=f"{prefix}{name} ")
    return found


def _subparsers(parser: argparse.ArgumentParser):
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def options(parser: argparse.ArgumentParser) -> list[Option]:
    """The arguments of one parser (sub-parser actions excluded): flags first, then positionals."""
    actions = [a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)]
    flags = [a for a in actions if a.option_strings]
    positionals = [a for a in actions if not a.option_strings]
    return [_option(parser, a) for a in flags + positionals]


def _option(parser: argparse.ArgumentParser, action: argparse.Action) -> Option:
    takes_value = action.nargs != 0
    choices = tuple(str(c) for c in action.choices) if action.choices is not None else ()
    free_text = takes_value and not choices and action.type in (None, str)
    formatter = parser._get_formatter()  # argparse's own rendering, so these read as `--help` does
    help_text = "" if action.help in (None, argparse.SUPPRESS) else formatter._expand_help(action)
    name = ", ".join(action.option_strings) if action.option_strings else action.dest
    return Option(tuple(action.option_strings), name, formatter._format_action_invocation(action), help_text,
                  takes_value, choices, free_text, isinstance(action, argparse._AppendAction), bool(action.required))
