"""Module-name patterns from a user's config, matched in linear time.

`target_modules` / `exclude_modules` regex strings and `rank_pattern` / `alpha_pattern` keys come from
files anyone can hand us (an adapter_config.json from the Hub, a server's adapter folder). Python's
backtracking `re` can take minutes on a key like `(.|.)*Z` while holding the GIL, so every such pattern
is matched with RE2, whose time is linear in the name's length. RE2 has no lookarounds or
backreferences; a pattern that uses them is refused with a ConfigError when the config is built.

Semantics follow PEFT: a target string must match the whole module name (`re.fullmatch`); a pattern key
must match the end of the name after an optional `prefix.` (`re.match(rf"(.*\\.)?({key})$", name)`).
"""

from __future__ import annotations

import functools

import re2

from lorakit.errors import ConfigError

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # the ConfigError says what is wrong; RE2 would also print to stderr


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str):
    return re2.compile(pattern, _OPTIONS)


def check_pattern(where: str, pattern: str) -> None:
    """Raise a ConfigError naming `where` (the field and key) if RE2 cannot compile `pattern`."""
    try:
        _compiled(pattern)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ConfigError(
            f"{where} is not a usable regular expression ({reason}). Patterns are matched with RE2 in linear "
            "time, which does not support lookarounds ((?=...), (?!...), (?<=...), (?<!...)) or "
            "backreferences (\\1); rewrite it without them") from None


def fullmatches(pattern: str, name: str) -> bool:
    """Does `pattern` match all of `name` (a target_modules / exclude_modules regex string)?"""
    return _compiled(pattern).fullmatch(name) is not None


def matches_name_end(key: str, name: str) -> bool:
    """Does a rank_pattern / alpha_pattern `key` match the end of `name`, after an optional `prefix.`?"""
    return _compiled(rf"(?:.*\.)?(?:{key})").fullmatch(name) is not None
