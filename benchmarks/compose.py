#!/usr/bin/env python
"""Adapter composition, measured in one run per section, same inputs for every contender.

Section "mixtures": per-request mixtures in the serving engine. A decode batch of 16 sequences on the
embedded model (random prompts of 16 tokens, 64 new tokens each, greedy, no early stop), 16 r=8
all-linear adapters resident, fp32:

  single      row i on adapter i
  half mixed  rows 0-7 as above; row i >= 8 on the mixture {a_i: 0.7, a_(i-8): -0.3}, i.e. the same batch
              with a second adapter added to half its rows (24 adapter terms a step instead of 16)

Target: half mixed / single >= 0.85 (tokens/s). Before timing, each mixture row's tokens are checked
against the same mixture composed offline (`lorakit.compose`, linear: exact) and served as one adapter.

Section "cat": `lorakit compose --method cat` of the shipped reverse_words and to_json adapters (weight 1
each, and `linear` at 0.5 each), run as the command a user types, with the collision check scoring both
skills' held-out exact match alone and composed (100 examples each; 16 with --quick). Target: each skill
keeps >= 90% of its exact match, or the collision report says by how much it does not.

Timing: both contenders are warmed up, then run alternately for --rounds rounds; rounds in which other
processes used the CPU are redone (see forward_vs_peft.py). Reported: tokens/s from the median round, and
the ratio of medians.

    python benchmarks/compose.py [--only mixtures|cat] [--rounds 5] [--json benchmarks/latest_compose.json]
    python benchmarks/compose.py --quick
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward_vs_peft import machine_info, time_pair  # noqa: E402
from serve_vs_peft import engine_runner, make_adapters  # noqa: E402

import lorakit  # noqa: E402
from lorakit.engine import Engine, EngineConfig  # noqa: E402
from lorakit.engine.engine import auto_threads  # noqa: E402
from lorakit.models import load_model, load_tokenizer  # noqa: E402

SECTIONS = ("mixtures", "cat")
TARGETS = {"half_mixed_vs_single": 0.85}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    p.add_argument("--quick", action="store_true", help="smoke run: 16 new tokens, 2 rounds")
    p.add_argument("--batch", type=int, default=16, help="sequences in the batch (even: half of them mix)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads (default: what lorakit serve gives the engine, auto_threads: 1 here)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    if args.batch < 2 or args.batch % 2:
        p.error(f"--batch must be an even number >= 2, got {args.batch}")
    if args.quick:
        args.rounds, args.new_tokens = 2, 16
    return args


# --- section "mixtures": per-request mixtures in the engine -----------------------------------------------

def half_mixed(names: list[str]) -> list:
    """Row i < n/2 on adapter i; row i >= n/2 on {a_i: 0.7, a_(i - n/2): -0.3}."""
    half = len(names) // 2
    return names[:half] + [{names[i]: 0.7, names[i - half]: -0.3} for i in range(half, len(names))]


def mixtures(args: argparse.Namespace, workdir: str) -> dict:
    base, tokenizer = load_model(None), load_tokenizer(None)
    paths = make_adapters(base, args.batch, 8, workdir)
    names = [f"a{i}" for i in range(args.batch)]
    rows = half_mixed(names)
    engine = Engine(EngineConfig(max_running=args.batch, max_loaded_adapters=2 * args.batch, max_model_len=256),
                    model=copy.deepcopy(base), tokenizer=tokenizer)
    for name, path in zip(names, paths):
        engine.add_adapter(name, path)
    torch.manual_seed(1)
    prompts = torch.randint(3, base.config.vocab_size, (args.batch, args.prompt_len)).tolist()
    fns = {"single": engine_runner(engine, prompts, names, args.new_tokens),
           "half mixed": engine_runner(engine, prompts, rows, args.new_tokens)}

    mixed_rows = [row for row in rows if isinstance(row, dict)]
    for i, mixture in enumerate(mixed_rows):  # the same mixtures, composed offline and served as adapters
        engine.add_adapter(f"composed{i}", lorakit.compose({n: paths[names.index(n)] for n in mixture},
                                                           list(mixture.values())))
    with torch.inference_mode():
        mixed = fns["half mixed"]()[args.batch // 2:]
        composed = engine_runner(engine, prompts[args.batch // 2:], [f"composed{i}" for i in range(len(mixed_rows))],
                                 args.new_tokens)()
    agree = sum(a == b for a, b in zip(mixed, composed))
    print(f"mixtures: the embedded model, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params, batch "
          f"{args.batch} x ({args.prompt_len} prompt + {args.new_tokens} new) tokens, fp32, "
          f"{torch.get_num_threads()} threads, LoRA on the {engine.slots.path} path")
    print(f"check: mixture rows == the same mixtures composed offline (lorakit.compose) on {agree}/{len(mixed)} rows "
          f"(greedy, {args.new_tokens} tokens)")

    timing = time_pair(fns, rounds=args.rounds, warmup=1, device="cpu", autocast=nullcontext)
    tokens = args.batch * args.new_tokens
    median = {name: statistics.median(t) for name, t in timing["times"].items()}
    rate = {name: tokens / t for name, t in median.items()}
    per_round = [m / s for m, s in zip(timing["times"]["single"], timing["times"]["half mixed"])]
    ratio = rate["half mixed"] / rate["single"]
    print(f"\n{'contender':<14}{'tokens/s':>10}{'median s':>10}")
    for name in fns:
        print(f"{name:<14}{rate[name]:>10.0f}{median[name]:>10.3f}")
    print(f"rounds kept {len(per_round)}, redone for contention {timing['rounds_redone_for_contention']}")
    verdict = "ok" if ratio >= TARGETS["half_mixed_vs_single"] else "MISSED"
    print(f"half mixed / single: {ratio:.2f} (median per round {statistics.median(per_round):.2f}; target >= "
          f"{TARGETS['half_mixed_vs_single']}) {verdict}")
    return {"setup": {"model": "embedded", "params": sum(p.numel() for p in base.parameters()),
                      "lora_path": engine.slots.path, "batch": args.batch, "prompt_len": args.prompt_len,
                      "new_tokens": args.new_tokens, "rank": 8, "targets": "all-linear", "dtype": "fp32",
                      "mixture": "row i >= batch/2: {a_i: 0.7, a_(i-batch/2): -0.3}"},
            "check": {"mixture_rows_equal_composed": agree, "mixture_rows": len(mixed)},
            "tokens_per_second": rate, "ratios": {"half_mixed_vs_single": ratio,
                                                  "half_mixed_vs_single_per_round": per_round},
            "targets": TARGETS, "timing": {k: v for k, v in timing.items() if k != "times"},
            "round_seconds": timing["times"]}


# --- section "cat": the shipped reverse_words and to_json adapters summed, as `lorakit compose` runs it ------

CAT_TARGET = 0.90   # share of each skill's held-out exact match the composition should keep, else the report says
CAT_INPUTS = {"reverse": ("examples/adapters/reverse", "examples/skills/reverse_words/heldout.jsonl"),
              "json": ("examples/adapters/json", "examples/skills/to_json/heldout.chat.jsonl")}


def cat(args: argparse.Namespace, workdir: str) -> dict:
    """`lorakit compose --method cat` of the two shipped adapters at weight 1 (and at 0.5 each), as a user runs
    it, with the collision check on each skill's held-out data; the figures are read from composition.json."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    samples = 16 if args.quick else 100
    results = {}
    for label, weight in (("cat 1:1", 1.0), ("linear 0.5:0.5", 0.5)):
        out = os.path.join(workdir, label.split()[0] + str(weight))
        command = [sys.executable, "-m", "lorakit.cli", "compose", "--method", label.split()[0], "--output", out,
                   "--eval-samples", str(samples)]
        for name, (folder, heldout) in CAT_INPUTS.items():
            command += ["--adapter", f"{name}={os.path.join(root, folder)}:{weight}",
                        "--eval", f"{name}={os.path.join(root, heldout)}"]
        done = subprocess.run(command, capture_output=True, text=True, cwd=root)
        if done.returncode != 0:
            raise SystemExit(f"lorakit compose failed:\n{done.stderr}")
        print(done.stdout.rstrip())
        with open(os.path.join(out, "composition.json")) as handle:
            collision = json.load(handle)["collision"]
        skills = {s["input"]: {"alone": s["alone"], "composed": s["composed"],
                               "retained": s.get("retained"), "drop_points": s.get("drop_points")}
                  for s in collision["skills"]}
        kept = all((s["retained"] or 0) >= CAT_TARGET for s in skills.values())
        print(f"{label}: every skill keeps >= {CAT_TARGET:.0%} of its exact match: {'yes' if kept else 'no'}; the "
              f"report warns for {', '.join(w.split(':')[0] for w in collision['warnings']) or 'none'}\n")
        results[label] = {"skills": skills, "warnings": collision["warnings"], "overlap": collision["overlap"],
                          "keeps_target": kept, "samples": samples, "command": shlex.join(command)}
    return {"target_retained": CAT_TARGET, "results": results}


# --- running the sections ---------------------------------------------------------------------------------

MEASURED = {"mixtures": mixtures, "cat": cat}


def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable] + sys.argv) if argv is None else shlex.join(argv)
    threads = args.threads or auto_threads(load_model(None))
    torch.set_num_threads(threads)
    chosen = args.only or [name for name in SECTIONS if name in MEASURED]
    missing = [name for name in chosen if name not in MEASURED]
    if missing:
        print(f"compose.py: section {', '.join(missing)} is not measured by this script yet", file=sys.stderr)
        return 2
    figures = {"command": command, "date": datetime.date.today().isoformat(), "machine": machine_info("cpu", threads)}
    with tempfile.TemporaryDirectory(prefix="compose-bench-") as workdir:
        for name in chosen:
            figures[name] = MEASURED[name](args, os.path.join(workdir, name))
    print(f"command: {command}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
