"""`lorakit compose --adapter NAME=DIR:WEIGHT ... --method M --output OUT`: adapters combined into one.

The output is an ordinary PEFT LoRA folder (see lorakit.compose for each method's math) with
`composition.json` and `lorakit_card.json` beside it: the method, every input's digest and weight, the
rank, and `--density` / `--seed` where they apply, so the result can be made again bit for bit. With
eval data (`--eval NAME=FILE`, or the held-out file an input's run recorded) the collision check scores
every skill alone and composed, and warns by name when one drops more than 10 points; `--no-check` skips
it, `--check` asks for it (an error when no input has eval data).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from lorakit.errors import ConfigError



def parse_input(text: str) -> tuple[str, str, float]:
    """NAME=DIR[:WEIGHT] -> (name, folder, weight); the weight defaults to 1."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ConfigError(f"--adapter {text!r}: expected NAME=DIR:WEIGHT, e.g. code=runs/code:0.7")
    folder, colon, weight = rest.rpartition(":")
    if not colon or Path(rest).exists():
        return name, rest, 1.0
    try:
        value = float(weight)
    except ValueError:
        raise ConfigError(f"--adapter {text!r}: weight {weight!r} is not a number (NAME=DIR:WEIGHT)") from None
    if not math.isfinite(value):
        raise ConfigError(f"--adapter {text!r}: weight {weight!r} is not a finite number")
    return name, folder, value


def parse_eval(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--eval {text!r}: expected NAME=FILE, the held-out data of input NAME")
    if not Path(path).is_file():
        raise ConfigError(f"--eval {text!r}: {path} is not a file")
    return name, Path(path)


def run(args: argparse.Namespace) -> int:
    from lorakit.compose import composition
    from lorakit.compose.collision import collision_report, recorded_eval_data
    from lorakit.io import Adapter
    from lorakit.io.safetensors_file import atomic_write
    from lorakit.signing.card import COMPOSITION_NAME, write_card

    if not args.adapter:
        raise ConfigError("give the adapters to compose with --adapter NAME=DIR:WEIGHT (one per input)")
    parsed = [parse_input(text) for text in args.adapter]
    evals = dict(parse_eval(text) for text in args.eval or [])
    unknown = sorted(set(evals) - {name for name, _, _ in parsed})
    if unknown:
        raise ConfigError(f"--eval {unknown[0]}=...: no input is named {unknown[0]!r}")
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise ConfigError(f"{output} is not empty; use --overwrite to replace what it holds or choose another --output")
    adapters = {name: Adapter.read(folder) for name, folder, _ in parsed}
    made = composition(adapters, [w for _, _, w in parsed], args.method, rank=args.rank, density=args.density,
                       seed=args.seed)
    if args.check is not False:
        for name, adapter in adapters.items():
            found = recorded_eval_data(adapter)
            if name not in evals and found is not None:
                evals[name] = found
        if args.check and not evals:
            raise ConfigError("--check needs eval data: give --eval NAME=FILE (no input recorded a held-out file)")
    record = made.record()
    if evals and args.check is not False:
        record["collision"] = collision_report(made, evals, args.model, samples=args.eval_samples)
    made.adapter.save(output)
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    atomic_write(output / COMPOSITION_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    write_card(output)
    print(summary(made, record, output))
    return 0


def summary(made, record: dict, output: Path) -> str:
    inputs = " + ".join(f"{i.weight:g}·{i.name}" for i in made.inputs)
    lines = [f"composed {inputs} ({made.method}, rank {made.rank}) -> {output}"
             + (" (the input itself: one adapter with weight 1)" if made.identity else "")]
    if made.kept:
        kept = record["kept_energy"]
        lines.append(f"  kept {100 * kept['min']:.1f}% (worst module) / {100 * kept['mean']:.1f}% (mean) of each "
                     "module's ‖ΔW‖² at this rank")
    elif not made.identity:
        lines.append("  kept 100% of every module's update (exact)")
    collision = record.get("collision", {})
    for pair in collision.get("overlap", []):
        lines.append(f"  overlap {pair['inputs'][0]} / {pair['inputs'][1]}: {pair['write']:.2f} written, "
                     f"{pair['read']:.2f} read (mean cos² of principal angles over {pair['modules']} modules; "
                     f"most: {pair['most']:.2f} in {pair['most_module']})")
    for skill in collision.get("skills", []):
        if skill.get("alone") is not None:
            lines.append(f"  {skill['input']}: exact match {100 * skill['alone']:.1f}% alone, "
                         f"{100 * skill['composed']:.1f}% composed ({skill['samples']} examples of {skill['data']})")
    lines += [f"  warning: {w}" for w in collision.get("warnings", [])]
    return "\n".join(lines)


def register(commands) -> None:
    from lorakit.compose import METHODS

    parser = commands.add_parser("compose", help="combine adapters into one (exact sums, SVD, TIES, DARE)")
    parser.add_argument("--adapter", action="append", metavar="NAME=DIR:WEIGHT",
                        help="an input adapter, its name and weight (default 1; negative subtracts); repeat per input")
    parser.add_argument("--method", default="linear", choices=METHODS,
                        help="linear/cat: the exact weighted sum; svd: it truncated to --rank; ties, dare_linear, "
                             "dare_ties, magnitude_prune: task-vector merges on each full update (default: linear)")
    parser.add_argument("--rank", type=int, help="rank of the result for svd and the pruning methods (default: the "
                                                 "largest input rank); linear and cat are exact at the sum of ranks")
    parser.add_argument("--density", type=float, help="ties/dare/magnitude_prune: share of each update's entries kept")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's random drop (recorded in the card)")
    parser.add_argument("--output", required=True, help="folder for the composed adapter")
    parser.add_argument("--overwrite", action="store_true", help="replace what --output holds")
    check = parser.add_mutually_exclusive_group()
    check.add_argument("--check", dest="check", action="store_true", default=None,
                       help="score every input's skill alone and composed (default: when eval data is known)")
    check.add_argument("--no-check", dest="check", action="store_false", help="skip the collision check")
    parser.add_argument("--eval", action="append", metavar="NAME=FILE",
                        help="held-out data of input NAME for the collision check (repeatable)")
    parser.add_argument("--eval-samples", type=int, default=64, help="examples scored per skill (default: 64)")
    parser.add_argument("--model", help="base model for the collision check (default: the base the inputs record)")
    parser.set_defaults(run=run)
