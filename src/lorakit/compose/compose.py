"""`lorakit.compose`: adapters combined into one ordinary PEFT LoRA adapter.

    mix = lorakit.compose({"code": "runs/code", "math": "runs/math"}, [0.7, -0.3], method="linear")
    mix.save("runs/code-minus-math")          # loads in lorakit, PEFT and vLLM like any adapter

For every module any input adapts, input i adds `ΔW_i = w_i s_i B_i A_i` (its own scale s_i: alpha/r, or
alpha/sqrt(r) with rsLoRA, after rank_pattern / alpha_pattern). The methods (math in `factors.py`):

    linear, cat    exact: ΔW = Σ_i w_i s_i B_i A_i, stored as the factors side by side. Any ranks, negative
                   weights, rsLoRA, inputs adapting different modules. The two names are one operation here
                   (PEFT's `linear` mixes A and B apart, which adds cross terms; its `cat` is this).
    svd            the exact sum truncated to `rank` (default: the largest input rank), per module the best
                   rank-R approximation, with the share of ‖ΔW‖² it keeps.
    ties, dare_linear, dare_ties, magnitude_prune
                   the task-vector merges, on each full ΔW_i (not on A and B apart), with `density` (and
                   `seed` for DARE's random drop), then truncated to `rank` like `svd`.

The result has one rank R for every module (Σ r_i for linear/cat: input i owns r_i of the rank, zero where
it does not adapt the module) and one alpha, `lora_alpha = R`, so its scale is 1 and each B carries
w_i s_i: one `r` and one `lora_alpha` is what every PEFT and vLLM version loads. Its weights are fp32.

Composing one adapter with weight 1.0 (and nothing truncated or pruned away) gives that adapter back
unchanged: the same value, the same digest, DoRA and rsLoRA included. Otherwise what cannot be added
exactly is refused: DoRA (a magnitude per row rescales W + ΔW as a whole), modules_to_save (full weights
that replace the base's), inputs trained on different base models, modules whose shapes disagree, and
activated LoRAs mixed with adapters of another invocation (those of one invocation compose, and keep it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

from lorakit.compose.factors import PRUNING_METHODS, Term, concatenated, full_rank_factors, pruned, truncated
from lorakit.core.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.io.adapter import PREFIX, Adapter, LoraFactors
from lorakit.io.base_record import BaseRecord

EXACT_METHODS = ("linear", "cat")
METHODS = (*EXACT_METHODS, "svd", *PRUNING_METHODS)
AdapterLike = Union[Adapter, str, Path]


@dataclass(frozen=True)
class Ingredient:
    """One input: its name in the composition, the adapter, and its weight w."""
    name: str
    adapter: Adapter
    weight: float


@dataclass(frozen=True)
class Composition:
    """The composed adapter and how it was made (`record()` is what the output's card keeps)."""
    adapter: Adapter
    method: str
    inputs: tuple[Ingredient, ...]
    rank: int
    density: Optional[float] = None
    seed: Optional[int] = None
    kept: Mapping[str, float] = field(default_factory=dict)   # module -> share of ‖ΔW‖² kept (svd, pruning)
    identity: bool = False                                     # one input, weight 1: given back unchanged

    def record(self) -> dict:
        kept = list(self.kept.values())
        return {
            "method": self.method,
            "inputs": [{"name": i.name, "source": i.adapter.source, "digest": i.adapter.digest, "weight": i.weight}
                       for i in self.inputs],
            "rank": self.rank,
            **({"density": self.density} if self.density is not None else {}),
            **({"seed": self.seed} if self.method in ("dare_linear", "dare_ties") else {}),
            **({"kept_energy": {"min": min(kept), "mean": sum(kept) / len(kept),
                                "modules": {m: round(v, 6) for m, v in self.kept.items()}}} if kept else {}),
            "digest": self.adapter.digest,
        }


def compose(adapters: Union[Mapping[str, AdapterLike], Sequence[AdapterLike]],
            weights: Optional[Sequence[float]] = None, method: str = "linear", *, rank: Optional[int] = None,
            density: Optional[float] = None, seed: int = 0) -> Adapter:
    """The composed adapter (see the module's docstring); `composition(...)` also says how it was made."""
    return composition(adapters, weights, method, rank=rank, density=density, seed=seed).adapter


def composition(adapters: Union[Mapping[str, AdapterLike], Sequence[AdapterLike]],
                weights: Optional[Sequence[float]] = None, method: str = "linear", *, rank: Optional[int] = None,
                density: Optional[float] = None, seed: int = 0) -> Composition:
    inputs = _ingredients(adapters, weights)
    _check_options(method, rank, density, inputs)
    largest = max(i.adapter.rank for i in inputs)
    target_rank = sum(i.adapter.rank for i in inputs) if method in EXACT_METHODS else (rank or largest)
    only = inputs[0]
    if len(inputs) == 1 and only.weight == 1.0 and target_rank >= only.adapter.rank and (density or 1.0) >= 1.0:
        return Composition(only.adapter, method, tuple(inputs), only.adapter.rank, density, seed, identity=True)
    _check_combinable(inputs)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    kept: dict[str, float] = {}
    for module in sorted({m for i in inputs for m in i.adapter.modules}):
        present = [(i, i.adapter.modules[module]) for i in inputs if module in i.adapter.modules]
        terms = [Term(_matrix_b(f), _matrix_a(f), i.weight * f.scale) for i, f in present]
        _check_shapes(module, present)
        if method in EXACT_METHODS:
            b, a = concatenated(terms, [i.adapter.rank for i, _ in present])
            b, a = _pad(b, a, target_rank)
        elif method == "svd":
            b, a, kept[module] = truncated(*concatenated(terms, [f.rank for _, f in present]), target_rank)
        else:
            b, a, kept[module] = full_rank_factors(pruned(terms, method, density, generator), target_rank)
        tensors.update(_keys(module, present[0][1], b, a))
    config = _config(inputs, target_rank, sorted({m for i in inputs for m in i.adapter.modules}))
    base = _base(inputs)
    label = ", ".join(f"{i.name}:{i.weight:g}" for i in inputs)
    adapter = Adapter.from_tensors(config, tensors, source=f"<{method} composition of {label}>", base=base)
    return Composition(adapter, method, tuple(inputs), target_rank, density,
                       seed if method in ("dare_linear", "dare_ties") else None, kept)


# --- inputs and checks -------------------------------------------------------------------------------
def _ingredients(adapters, weights) -> list[Ingredient]:
    if isinstance(adapters, Mapping):
        named = list(adapters.items())
    else:
        named = [(_default_name(a, n), a) for n, a in enumerate(adapters)]
    if not named:
        raise ConfigError("compose needs at least one adapter")
    weights = [1.0] * len(named) if weights is None else list(weights)
    if len(weights) != len(named):
        raise ConfigError(f"{len(named)} adapters but {len(weights)} weights; give one weight per adapter")
    names = [name for name, _ in named]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"adapter name {repeated[0]!r} is given twice; each input needs its own name")
    out = []
    for (name, adapter), weight in zip(named, weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"adapter {name!r}: weight {weight!r} is not a finite number")
        out.append(Ingredient(name, adapter if isinstance(adapter, Adapter) else Adapter.read(adapter), float(weight)))
    return out


def _default_name(adapter: AdapterLike, n: int) -> str:
    return Path(adapter.source if isinstance(adapter, Adapter) else adapter).name or f"adapter{n}"


def _check_options(method: str, rank: Optional[int], density: Optional[float], inputs: list[Ingredient]) -> None:
    if method not in METHODS:
        raise ConfigError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if method in EXACT_METHODS and rank is not None:
        total = sum(i.adapter.rank for i in inputs)
        raise ConfigError(f"{method} is exact at rank {total} (the sum of the inputs' ranks), so it takes no rank; "
                          "to truncate, use method 'svd' with a rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer; got {rank!r}")
    if method in PRUNING_METHODS:
        if density is None:
            raise ConfigError(f"{method} needs a density: the share of each update's entries kept, in (0, 1]")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConfigError(f"density must be in (0, 1]; got {density!r}")
    elif density is not None:
        raise ConfigError(f"density applies to {', '.join(PRUNING_METHODS)}, not to {method}")


def _check_combinable(inputs: list[Ingredient]) -> None:
    for i in inputs:
        config = i.adapter.config
        if config.use_dora:
            raise ConfigError(
                f"adapter {i.name!r} uses DoRA: its per-row magnitudes rescale W + ΔW as a whole, so DoRA updates "
                "do not add and no composition of them is exact. Merge it into the base model (lorakit merge) and "
                "compose the other adapters on that model, or compose it alone with weight 1 to get it back.")
        if i.adapter.saved_modules:
            shown = ", ".join(sorted(i.adapter.saved_modules)[:3])
            raise ConfigError(
                f"adapter {i.name!r} holds full weights for modules_to_save ({shown}), which replace the base's "
                "rather than add to it, so they cannot be weighted and summed; compose adapters without "
                "modules_to_save, or merge this one into the base model first (lorakit merge)")
    invocations = {repr(i.adapter.config.alora_invocation_tokens) for i in inputs}
    if len(invocations) > 1:
        shown = ", ".join(f"{i.name}: {i.adapter.config.alora_invocation_tokens}" for i in inputs)
        raise ConfigError(f"the inputs start their updates at different invocations ({shown}); an activated LoRA "
                          "(alora_invocation_tokens) composes exactly only with adapters of the same invocation")
    layouts = {i.adapter.config.fan_in_fan_out for i in inputs}
    if len(layouts) > 1:
        raise ConfigError("the inputs disagree on fan_in_fan_out (they were saved from different model types)")
    recorded = [i for i in inputs if i.adapter.base is not None]
    for n, x in enumerate(recorded):
        for y in recorded[n + 1:]:
            module = _disagreeing_probe(x.adapter.base, y.adapter.base)
            if module is not None:
                raise ConfigError(
                    f"adapters {x.name!r} and {y.name!r} were trained on different base models "
                    f"({x.adapter.base.describe()} and {y.adapter.base.describe()}: their recorded weights of "
                    f"{module} differ); their updates do not add. Compose adapters of one base model.")


def _disagreeing_probe(x: BaseRecord, y: BaseRecord) -> Optional[str]:
    """A module whose base weight values the two records sample differently (beyond bf16 rounding), if any."""
    for module in sorted(set(x.probe) & set(y.probe)):
        mine, theirs = x.probe[module], y.probe[module]
        if [p[:2] for p in mine] != [p[:2] for p in theirs]:
            return module
        if any(abs(a[2] - b[2]) > 1e-2 * max(abs(a[2]), abs(b[2]), 1e-6) for a, b in zip(mine, theirs)):
            return module
    return None


def _base(inputs: list[Ingredient]) -> Optional[BaseRecord]:
    """The composed adapter's base record: the inputs' probes together; their digest when they cover the same
    modules (a digest is over the adapted modules), else none (the probes still identify the base)."""
    recorded = [i.adapter for i in inputs if i.adapter.base is not None]
    if not recorded:
        return None
    first = recorded[0].base
    probe = {m: p for a in recorded for m, p in a.base.probe.items()}
    same = len({a.base.digest for a in recorded}) == 1 and len(recorded) == len(inputs)
    return BaseRecord(first.name, first.source, first.digest if same else None, probe)

def _check_shapes(module: str, present: list[tuple[Ingredient, LoraFactors]]) -> None:
    first, factors = present[0]
    for other, theirs in present[1:]:
        if (theirs.embedding != factors.embedding or theirs.a.shape[1:] != factors.a.shape[1:]
                or theirs.b.shape[0] != factors.b.shape[0] or theirs.b.shape[2:] != factors.b.shape[2:]):
            raise ConfigError(
                f"module {module}: adapter {first.name!r} has A {tuple(factors.a.shape)}, B {tuple(factors.b.shape)} "
                f"but {other.name!r} has A {tuple(theirs.a.shape)}, B {tuple(theirs.b.shape)}; the adapters do not "
                "fit the same model")


# --- building the result -----------------------------------------------------------------------------
def _matrix_a(factors: LoraFactors) -> torch.Tensor:
    return factors.a.reshape(factors.rank, -1)                             # (r, d_in[·k·k])


def _matrix_b(factors: LoraFactors) -> torch.Tensor:
    return factors.b.reshape(factors.b.shape[0], factors.rank)             # (d_out, r)


def _pad(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero columns of B and rows of A up to `rank`: the same product, one rank for every module."""
    extra = rank - a.shape[0]
    return (torch.nn.functional.pad(b, (0, extra)), torch.nn.functional.pad(a, (0, 0, 0, extra))) if extra else (b, a)


def _keys(module: str, like: LoraFactors, b: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
    """The module's factors under PEFT's keys, in the shapes of `like` (a convolution's or an embedding's)."""
    rank = a.shape[0]
    a = a.reshape(rank, *like.a.shape[1:]).float().contiguous()
    b = b.reshape(b.shape[0], rank, *like.b.shape[2:]).float().contiguous()
    if like.embedding:
        return {f"{PREFIX}{module}.lora_embedding_A": a, f"{PREFIX}{module}.lora_embedding_B": b}
    return {f"{PREFIX}{module}.lora_A.weight": a, f"{PREFIX}{module}.lora_B.weight": b}


def _config(inputs: list[Ingredient], rank: int, modules: list[str]) -> LoraConfig:
    """One r and lora_alpha = r (scale 1); the inputs' target spec when they share one, else the modules by name."""
    configs = [i.adapter.config for i in inputs]
    specs = {(repr(c.target_modules), repr(c.exclude_modules)) for c in configs}
    shared = len(specs) == 1
    first = configs[0]
    return LoraConfig(
        r=rank, lora_alpha=rank,
        target_modules=first.target_modules if shared else modules,
        exclude_modules=first.exclude_modules if shared else None,
        fan_in_fan_out=first.fan_in_fan_out,
        alora_invocation_tokens=first.alora_invocation_tokens,
        task_type=next((c.task_type for c in configs if c.task_type), None),
        base_model_name_or_path=next((c.base_model_name_or_path for c in configs if c.base_model_name_or_path), None),
    )
