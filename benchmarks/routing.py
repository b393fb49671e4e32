"""Routing by prompt (model "auto"): how often it picks the right adapter, and what it adds to a prefill.

    python benchmarks/routing.py [--prompts N] [--threads T] [--json PATH]

Accuracy, over every held-out prompt of the example skills (examples/skills/*/heldout.jsonl and
heldout.chat.jsonl: 6 skills x 2 formats x 200 prompts), routed with engine/routing.py as the server does:

    shipped        the adapters in examples/adapters (reverse, json, count) with the signatures they ship;
                   right: a prompt of their skill goes to its adapter, any other prompt to the base model
    every skill    a signature per skill from its training prompts (train.jsonl and train.chat.jsonl);
                   right: the prompt's own skill
    leave one out  for each skill, the other five skills' signatures only; right: the base model (the
                   hardest case: count_words and reverse_words prompts differ in one word)

Overhead, in one run on the embedded model, the engine in this process with the shipped adapters: for
`--prompts` held-out prompts (spread over the skills), the route `Engine.route` computes before a model
"auto" request is queued, against the prompt's prefill (`submit` with max_tokens=1 on its adapter, run to
its first token), interleaved prompt by prompt; the ratio of the medians and the median of the
per-prompt ratios. Also the time to first token of `submit_routed` against `submit` on the same adapter,
and, for reference, what a signature at a deeper layer would cost (the base's first L layers on the prompt).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SKILLS = ROOT / "examples" / "skills"
ADAPTERS = ROOT / "examples" / "adapters"
SHIPPED = {"reverse_words": "reverse", "to_json": "json", "count_words": "count"}  # skill -> adapter


def held_out(tokenizer, skill: str) -> list[list[int]]:
    from lorakit.data import generation_prompt, read_rows

    return [generation_prompt(row, tokenizer)[0] for name in ("heldout.jsonl", "heldout.chat.jsonl")
            for row in read_rows(SKILLS / skill / name)]


def accuracy(model, tokenizer, skills: list[str]) -> dict:
    from lorakit.data import read_rows
    from lorakit.engine.routing import Router, RoutingSignature, compute_signature, signature_prompts

    router = Router(model)
    prompts = {skill: held_out(tokenizer, skill) for skill in skills}
    shipped = [(adapter, RoutingSignature.load(ADAPTERS / adapter)) for adapter in SHIPPED.values()]
    own = {skill: compute_signature(model, [p for name in ("train.jsonl", "train.chat.jsonl")
                                            for p in signature_prompts(read_rows(SKILLS / skill / name), tokenizer)])
           for skill in skills}
    scenarios = {
        "shipped": lambda skill: (shipped, SHIPPED.get(skill)),
        "every skill": lambda skill: ([(s, own[s]) for s in skills], skill),
        "leave one out": lambda skill: ([(s, own[s]) for s in skills if s != skill], None),
    }
    results = {}
    for scenario, setup in scenarios.items():
        per_skill = {}
        for skill in skills:
            signed, right = setup(skill)
            per_skill[skill] = sum(router.route_signed(ids, signed).adapter == right for ids in prompts[skill])
        total = sum(len(prompts[s]) for s in skills)
        results[scenario] = {"right": sum(per_skill.values()), "prompts": total,
                             "accuracy": round(sum(per_skill.values()) / total, 4), "per_skill": per_skill}
    return results


def overhead(prompts: list[tuple[list[int], str]]) -> dict:
    """Route vs prefill, interleaved per prompt, on an engine in this process."""
    from lorakit.engine import Engine, EngineConfig, SamplingParams
    from lorakit.engine.routing import prompt_state

    engine = Engine(EngineConfig(model=None, max_running=4))
    for adapter in SHIPPED.values():
        engine.add_adapter(adapter, ADAPTERS / adapter)
    candidates, first = list(SHIPPED.values()), SamplingParams(max_tokens=1, temperature=0)

    def timed(call) -> float:
        began = time.perf_counter()
        call()
        return time.perf_counter() - began

    def prefill(ids, adapter) -> None:
        engine.submit(ids, first, adapter)
        engine.run_until_idle()

    def routed(ids) -> None:
        engine.submit_routed(ids, first, candidates)
        engine.run_until_idle()

    for ids, adapter in prompts[:5]:  # warm-up: slots written, kernels and caches ready
        prefill(ids, adapter), routed(ids), engine.route(ids, candidates)
    rows = []
    for i, (ids, adapter) in enumerate(prompts):
        prefill(ids, adapter)  # untimed: whatever switching to this adapter costs is paid before the timed runs
        runs = {"route": lambda: engine.route(ids, candidates), "prefill": lambda: prefill(ids, adapter),
                "auto": lambda: routed(ids), "direct": lambda: prefill(ids, adapter)}
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        rows.append({name: timed(runs[name]) for name in order})
    deeper = {}
    for layer in (1, 3, engine.model.config.num_hidden_layers):
        ratios = [timed(lambda: prompt_state(engine.model, ids, layer, torch.device("cpu")))
                  / timed(lambda: prefill(ids, adapter)) for ids, adapter in prompts[:40]]
        deeper[f"layer {layer}"] = round(statistics.median(ratios), 4)
    med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    return {
        "prompts": len(rows), "mean_prompt_tokens": round(statistics.mean(len(ids) for ids, _ in prompts), 1),
        "route_ms_median": round(1e3 * med["route"], 4), "prefill_ms_median": round(1e3 * med["prefill"], 3),
        "route_over_prefill_ratio_of_medians": round(med["route"] / med["prefill"], 4),
        "route_over_prefill_median_ratio": round(statistics.median(r["route"] / r["prefill"] for r in rows), 4),
        "auto_over_direct_first_token_median_ratio": round(statistics.median(r["auto"] / r["direct"] for r in rows), 4),
        "deeper_layer_state_over_prefill": deeper,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=300, help="prompts timed for the overhead (default: 300)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: 1, as the engine process runs the embedded model)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lorakit.models import load_model, load_tokenizer

    command = "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    machine = (f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores available, "
               f"{torch.get_num_threads()} torch thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"{command}\n{datetime.now(timezone.utc).isoformat(timespec='seconds')}; {machine}; torch {torch.__version__}")
    model, tokenizer = load_model(None), load_tokenizer(None)
    skills = sorted(p.name for p in SKILLS.iterdir() if p.is_dir())
    began = time.perf_counter()
    routed = accuracy(model, tokenizer, skills)
    print(f"accuracy over {routed['shipped']['prompts']} held-out prompts ({time.perf_counter() - began:.0f} s)")
    for scenario, result in routed.items():
        print(f"  {scenario:14s} {result['right']:5d} / {result['prompts']}  {100 * result['accuracy']:.2f}%   "
              + ", ".join(f"{s} {n}" for s, n in result["per_skill"].items()))
    own = {skill: held_out(tokenizer, skill) for skill in SHIPPED}  # alternating skills, both formats
    prompts = [(own[skill][i], adapter) for i in range(len(own["reverse_words"])) for skill, adapter in SHIPPED.items()]
    prompts = prompts[::max(1, len(prompts) // args.prompts)][:args.prompts]
    cost = overhead(prompts)
    print(f"overhead over {cost['prompts']} prompts of {cost['mean_prompt_tokens']} tokens on average:")
    print(f"  route {cost['route_ms_median']:.3f} ms, prefill {cost['prefill_ms_median']:.2f} ms (medians): "
          f"route / prefill {cost['route_over_prefill_ratio_of_medians']:.4f} (ratio of medians), "
          f"{cost['route_over_prefill_median_ratio']:.4f} (median of per-prompt ratios)")
    print(f"  first token, model \"auto\" / the adapter named: {cost['auto_over_direct_first_token_median_ratio']:.4f}")
    print("  a signature at a deeper layer would cost, of a prefill: "
          + ", ".join(f"{k} {v:.3f}" for k, v in cost["deeper_layer_state_over_prefill"].items()))
    if args.json:
        record = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine, "load_average_after": round(os.getloadavg()[0], 1),
                  "torch": torch.__version__, "accuracy": routed, "overhead": cost}
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
