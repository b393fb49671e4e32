"""`lorakit completion bash|zsh`: a shell completion script, written from the `lorakit` parser itself.

Subcommands, each one's flags, the fixed values of flags that have them (`--schedule cosine|linear|...`)
and file names for free-text values (paths, mostly) all come from `introspect`, so the script knows every
flag the installed lorakit has; regenerate it after an upgrade. Completion runs no Python: the script is
plain shell, so a TAB costs nothing.

    source <(lorakit completion bash)            # in ~/.bashrc
    lorakit completion zsh > "${fpath[1]}/_lorakit"   # zsh, then restart it (compinit must run)
"""

from __future__ import annotations

import argparse
import re

from lorakit.cli.introspect import Command, Option, options, subcommands

SHELLS = ("bash", "zsh")
_WORD = re.compile(r"^[\w.,:+-]+$")  # what a flag or a fixed value may hold to go into a script unquoted


def register(commands) -> None:
    parser = commands.add_parser("completion", help="print a shell completion script (bash or zsh)",
                                 description="Print a completion script for the shell, generated from lorakit's "
                                             "own flags. bash: `source <(lorakit completion bash)` in ~/.bashrc; "
                                             "zsh: `lorakit completion zsh > \"${fpath[1]}/_lorakit\"`, then "
                                             "restart zsh.")
    parser.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.cli import build_parser

    print(script(args.shell, build_parser()), end="")
    return 0


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for `shell` ("bash" or "zsh") of `parser` (the `lorakit` command's)."""
    commands, top = subcommands(parser), options(parser)
    for option in top + [o for c in commands for o in c.options]:
        for word in option.flags + option.choices:
            if not _WORD.match(word):
                raise ValueError(f"{word!r} cannot go into a completion script unquoted")
    return _bash(commands, top) if shell == "bash" else _zsh(commands, top)


# -- bash --------------------------------------------------------------------------------------------------
def _bash(commands: list[Command], top: list[Option]) -> str:
    branches = [_bash_branch(c, _actions(c, commands)) for c in commands]
    first_words = " ".join([c.name for c in commands if " " not in c.name] + [f for o in top for f in o.flags])
    nested = "|".join(c.name for c in commands if _actions(c, commands)) or "''"
    return f"""\
# bash completion for lorakit, written by `lorakit completion bash` from lorakit's own flags.
# Use: source <(lorakit completion bash)  (in ~/.bashrc), or save it as
# ~/.local/share/bash-completion/completions/lorakit

_lorakit_words() {{  # the words of $1 (split at spaces: none holds one) that start with $2
    COMPREPLY=($(compgen -W "$1" -- "$2"))
}}

_lorakit_files() {{  # file and folder names that start with $1 (one a line: they may hold spaces)
    local IFS=$'\\n'
    compopt -o filenames 2>/dev/null
    COMPREPLY=($(compgen -f -- "$1"))
}}

_lorakit() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} command= i
    COMPREPLY=()
    # `--flag=value`: bash splits it at '=', so look past the '=' for the flag
    if [[ $cur == = ]]; then cur=; elif [[ $prev == = ]]; then prev=${{COMP_WORDS[COMP_CWORD-2]}}; fi
    for ((i = 1; i < COMP_CWORD; i++)); do  # the command, and the action of a command that has actions
        case ${{COMP_WORDS[i]}} in
            -*) ;;
            *) if [[ -z $command ]]; then
                   command=${{COMP_WORDS[i]}}
                   case $command in {nested}) ;; *) break ;; esac
               else
                   command="$command ${{COMP_WORDS[i]}}"; break
               fi ;;
        esac
    done
    case $command in
        "") _lorakit_words "{first_words}" "$cur" ;;
{"".join(branches)}    esac
}}

complete -F _lorakit lorakit
"""


def _actions(command: Command, commands: list[Command]) -> list[str]:
    """The action names of a command that has actions (`registry` -> add, list, ...), else []."""
    return [c.name.split(" ")[-1] for c in commands if c.name.startswith(command.name + " ")
            and " " not in c.name[len(command.name) + 1:]]


def _bash_branch(command: Command, actions: list[str]) -> str:
    flags = [o for o in command.options if o.flags]
    values = []
    for option in (o for o in flags if o.takes_value):
        pattern = "|".join(option.flags)
        if option.choices:
            values.append(f'{pattern}) _lorakit_words "{" ".join(option.choices)}" "$cur"; return ;;')
        elif option.completes_files:
            values.append(f'{pattern}) _lorakit_files "$cur"; return ;;')
        else:
            values.append(f"{pattern}) return ;;  # a number or a size: nothing to offer")
    positional = _bash_positional([o for o in command.options if not o.flags])
    if actions:
        positional = f'_lorakit_words "{" ".join(actions)}" "$cur"'
    flag_words = " ".join(f for o in flags for f in o.flags)
    inner = "\n".join(f"                {v}" for v in values)
    return f"""\
        {_quote(command.name) if " " in command.name else command.name})
            case $prev in
{inner}
            esac
            if [[ $cur == -* ]]; then _lorakit_words "{flag_words}" "$cur"; else {positional}; fi ;;
"""


def _bash_positional(positionals: list[Option]) -> str:
    """What a word that is not a flag completes to: the first positional's values, files, or nothing."""
    if not positionals:
        return ":"
    first = positionals[0]
    if first.choices:
        return f'_lorakit_words "{" ".join(first.choices)}" "$cur"'
    return '_lorakit_files "$cur"' if first.completes_files else ":"


# -- zsh ---------------------------------------------------------------------------------------------------
def _zsh(commands: list[Command], top: list[Option]) -> str:
    described = "\n".join(f"        {_quote(_escape_name(c.name) + ':' + _short(c.help))}" for c in commands)
    top_specs = " \\\n        ".join([*(_quote(s) for o in top for s in _zsh_specs(o)),
                                      "'1: :->command'", "'*:: :->arguments'"])
    branches = "\n".join(_zsh_branch(c, [a for a in commands if a.name.startswith(c.name + " ")])
                         for c in commands if " " not in c.name)
    return f"""\
#compdef lorakit
# zsh completion for lorakit, written by `lorakit completion zsh` from lorakit's own flags.
# Use: lorakit completion zsh > "${{fpath[1]}}/_lorakit"  and restart zsh (compinit must run), or
# source <(lorakit completion zsh)  in ~/.zshrc after compinit.

_lorakit() {{
    local curcontext=$curcontext state line ret=1
    local -a commands
    commands=(
{described}
    )
    _arguments -C \\
        {top_specs} && ret=0
    case $state in
        command) _describe -t commands 'lorakit command' commands && ret=0 ;;
        arguments)
            case $words[1] in
{branches}
            esac ;;
    esac
    return ret
}}

if [[ $funcstack[1] == _lorakit ]]; then
    _lorakit "$@"
else
    compdef _lorakit lorakit
fi
"""


def _zsh_branch(command: Command, actions: list[Command]) -> str:
    """`name) _arguments ...`; a command with actions (`registry add ...`) completes the action's name, then,
    past it, that action's own flags (words shifted so the action reads as the command)."""
    if not actions:
        return f"""\
                {command.name})
                    _arguments \\
                        {_zsh_joined(command, "                        ")} && ret=0 ;;"""
    names = " ".join(a.name.split(" ")[-1] for a in actions)
    nested = "\n".join(f"""\
                            {a.name.split(" ")[-1]})
                                shift words; (( CURRENT-- ))
                                _arguments \\
                                    {_zsh_joined(a, "                                    ")} && ret=0 ;;"""
                        for a in actions)
    own = _zsh_joined(command, "                            ", extra=[_quote(f"1:action:({names})")])
    return f"""\
                {command.name})
                    if (( CURRENT > 2 )); then
                        case $words[2] in
{nested}
                        esac
                    else
                        _arguments \\
                            {own} && ret=0
                    fi ;;"""


def _zsh_joined(command: Command, indent: str, extra: tuple | list = ()) -> str:
    specs = [_quote(s) for o in command.options for s in _zsh_specs(o)] + list(extra)
    return f" \\\n{indent}".join(specs)


def _zsh_specs(option: Option) -> list[str]:
    """_arguments specs for one option: `--flag=[what it is]:value:action`, one per spelling."""
    value = ""
    if option.takes_value:
        name = option.flags[-1].lstrip("-") if option.flags else option.name
        action = f"({' '.join(option.choices)})" if option.choices else ("_files" if option.completes_files else " ")
        value = f":{name}:{action}"
    if not option.flags:
        return [(":" if option.required else "::") + value[1:]]
    description = f"[{_escape_description(_short(option.help))}]"
    repeat = "*" if option.repeatable else ""
    return [f"{repeat}{flag}{'=' if option.takes_value else ''}{description}{value}" for flag in option.flags]


def _short(text: str) -> str:
    """A help text cut to what fits beside a completion: its first clause, at most 70 characters."""
    text = text.split(" (default")[0].split("; ")[0].strip()
    return text if len(text) <= 70 else text[:67].rstrip() + "..."


def _escape_description(text: str) -> str:
    return text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")


def _escape_name(text: str) -> str:
    return text.replace(":", "\\:")


def _quote(text: str) -> str:
    """`text` in single quotes for the shell."""
    return "'" + text.replace("'", "'\\''") + "'"
