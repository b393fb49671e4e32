"""`LoraConfig`: what to adapt and how, with PEFT's field names and meanings.

A LoRA update of a frozen weight W (d_out × d_in) is `ΔW = s · B A` with A (r × d_in), B (d_out × r) and
`s = lora_alpha / r` (rsLoRA: `lora_alpha / sqrt(r)`, which keeps the update's scale stable as r grows).
The config is validated when it is built, so an impossible value fails here, with the field's name,
rather than deep inside a training run.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Union

from lorakit.core.patterns import check_pattern, matches_name_end
from lorakit.errors import ConfigError

TargetSpec = Union[str, list[str], None]

ALL_LINEAR = "all-linear"

# init_lora_weights values: True = Kaiming-uniform A, zero B (PEFT's default); "gaussian" = N(0, 1/r) A,
# zero B; "pissa" / "pissa_niter_<k>" = principal singular vectors (exact / randomised SVD); False = both
# random, so an untrained adapter already changes the output (for tests).
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_names(field_name: str, value: Any, allow_regex: bool) -> TargetSpec:
    """A module-name spec: None, a regex string (fullmatch), or a list of names / dotted suffixes."""
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_regex:
            return [value]
        if value.lower() == ALL_LINEAR:
            return ALL_LINEAR
        check_pattern(f"{field_name}={value!r}", value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        for name in names:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{field_name} entries must be non-empty module names; got {name!r}")
        if not names:
            raise ConfigError(f"{field_name} is an empty list; give at least one module name or leave it unset")
        return names
    raise ConfigError(f"{field_name} must be a module name, a list of names or a regex string; got {value!r}")


def _check_pattern(field_name: str, value: Any, check_value) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{field_name} must map module-name patterns to values; got {type(value).__name__}")
    for pattern, item in value.items():
        if not isinstance(pattern, str):
            raise ConfigError(f"{field_name} keys must be module-name patterns (strings); got {pattern!r}")
        check_pattern(f"{field_name} key {pattern!r}", pattern)
        check_value(f"{field_name}[{pattern!r}]", item)
    return dict(value)


def _check_rank(where: str, r: Any) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"{where} must be a positive integer (the LoRA rank); got {r!r}")


def _is_finite(value: Any) -> bool:
    """A number that a float holds: an integer of 400 digits is not (math.isfinite raises OverflowError)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_alpha(where: str, alpha: Any) -> None:
    if not _is_number(alpha) or not _is_finite(alpha) or alpha <= 0:
        raise ConfigError(f"{where} must be a finite number > 0 (the scale is alpha / r); got {alpha!r}")


def _check_invocation(tokens: Any) -> Union[list[int], None]:
    if tokens is None:
        return None
    if (not isinstance(tokens, (list, tuple)) or not tokens
            or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in tokens)):
        raise ConfigError(f"alora_invocation_tokens must be a non-empty list of token ids; got {tokens!r}")
    return list(tokens)


@dataclass
class LoraConfig:
    """Which modules get a low-rank update, of what rank and scale, initialised how.

    Field names and meanings follow PEFT's `LoraConfig`, so `adapter_config.json` files move between
    the two unchanged.

    r: rank of the update (A is r × d_in, B is d_out × r).
    lora_alpha: scale numerator; the update is multiplied by `lora_alpha / r`.
    lora_dropout: dropout probability on the adapter's input, during training only.
    target_modules: module names matched as the full name or a `.name` suffix; a string is a regex
        (RE2 syntax: no lookarounds or backreferences) that must match the full name; "all-linear" is
        every linear layer except the output head; None picks the usual targets for known architectures.
    exclude_modules: same matching rules; these are never adapted.
    bias: only "none" is supported (biases stay frozen).
    use_rslora: scale by `lora_alpha / sqrt(r)` instead of `lora_alpha / r`.
    init_lora_weights: True (Kaiming A, zero B), "gaussian", "pissa", "pissa_niter_<k>" or False.
    rank_pattern / alpha_pattern: per-module overrides; a key is a regex matched against the end of the
        module name at a dot boundary (`(.*\\.)?key$`), as in PEFT; RE2 syntax, as for target_modules.
    modules_to_save: modules trained in full (a trainable copy per adapter), e.g. a classifier head.
    use_dora: weight-decomposed LoRA (DoRA): a learned magnitude per output row times the direction
        of `W + s·BA`.
    fan_in_fan_out: set automatically for layers that store weights as (in, out), like GPT-2's Conv1D.
    alora_invocation_tokens: activated LoRA (aLoRA): the token ids of an invocation sequence; the update
        applies only from the start of its last occurrence in the input onwards, so everything before it is
        computed as the base model computes it (and its KV cache is the base's). PEFT's field and meaning.
    task_type / base_model_name_or_path / revision / inference_mode: metadata PEFT records.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: Union[list[str], None] = None
    use_dora: bool = False
    fan_in_fan_out: bool = False
    task_type: Union[str, None] = None
    base_model_name_or_path: Union[str, None] = None
    revision: Union[str, None] = None
    inference_mode: bool = False
    alora_invocation_tokens: Union[list[int], None] = None

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be a probability in [0, 1); got {self.lora_dropout!r}")
        self.target_modules = _check_names("target_modules", self.target_modules, allow_regex=True)
        self.exclude_modules = _check_names("exclude_modules", self.exclude_modules, allow_regex=True)
        if self.exclude_modules == ALL_LINEAR:
            raise ConfigError("exclude_modules cannot be 'all-linear'; that would leave nothing to adapt")
        self.modules_to_save = _check_names("modules_to_save", self.modules_to_save, allow_regex=False)
        if self.bias != "none":
            raise ConfigError(
                f"bias={self.bias!r} is not supported: lorakit keeps biases frozen (bias='none'). To train a "
                "layer's bias, list that layer in modules_to_save."
            )
        for flag in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be true or false; got {getattr(self, flag)!r}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in ("gaussian", "pissa") or _PISSA_NITER.fullmatch(str(init))):
            raise ConfigError(
                f"init_lora_weights={init!r} is not supported; use true, false, 'gaussian', 'pissa' or "
                "'pissa_niter_<k>'"
            )
        self.alora_invocation_tokens = _check_invocation(self.alora_invocation_tokens)
        if self.alora_invocation_tokens is not None and self.use_dora:
            raise ConfigError("alora_invocation_tokens with use_dora: an activated LoRA is a plain LoRA update that "
                              "starts at its invocation; DoRA's magnitudes rescale every position. Choose one.")
        self.rank_pattern = _check_pattern("rank_pattern", self.rank_pattern, _check_rank)
        self.alpha_pattern = _check_pattern("alpha_pattern", self.alpha_pattern, _check_alpha)

    # --- per-module values ---------------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        """The rank of the module at `module_name`, after `rank_pattern`."""
        return self._pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        """The alpha of the module at `module_name`, after `alpha_pattern`."""
        return self._pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @staticmethod
    def _pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
        for key, value in pattern.items():
            if matches_name_end(key, module_name):
                return value
        return default

    @property
    def pissa_niter(self) -> Union[int, None]:
        """None for an exact SVD, else the power iterations of the randomised SVD ('pissa_niter_<k>')."""
        match = _PISSA_NITER.fullmatch(str(self.init_lora_weights))
        return int(match.group(1)) if match else None

    @property
    def is_alora(self) -> bool:
        return self.alora_invocation_tokens is not None

    @property
    def is_pissa(self) -> bool:
        return isinstance(self.init_lora_weights, str) and self.init_lora_weights.startswith("pissa")

    def replace(self, **changes: Any) -> "LoraConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, lists rather than sets."""
        return dataclasses.asdict(self)
