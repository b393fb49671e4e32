#!/usr/bin/env python
"""Merged/unmerged switching (`engine/switching.py`) against the two fixed modes, on two traces, one run.

One in-process engine on the embedded model (fp32, 16 rows, 1 thread) serving 16 random adapters
(r=--rank on every linear layer, α=2r), and two traces made with a fixed seed: --requests requests
with prompts of 8-32 random tokens and 16-48 new tokens each (greedy, end of sequence ignored),
arriving as a Poisson process at --load times the rate the unmerged engine sustains on that trace
(measured at the start of the run on its first 96 requests, all at once), so that a queue builds up:

    skewed   90% of the requests on adapter 0, the rest spread evenly over adapters 1-15
    uniform  every request on one of the 16 adapters, evenly

Each trace is served by each policy on the same engine (the policy object swapped between runs, so
every policy uses the same weights, kernels and cache), one after the other in an order that rotates
between rounds:

    off           always unmerged, arrival order                        } the two fixed modes
    merged        merged whenever a batch is on one adapter, arrival order }
    auto          the engine's default: turns under contention, merged where the measured costs say so
    turns-merged  with --reference: adapters take turns, every turn merged (dLoRA's merge-only policy)

Time is the engine's own: the script steps the engine on its thread and its clock is that thread's CPU
time (plus the idle gaps before arrivals); requests arrive, are held and wait on that clock, and the
policy times its steps with it. Other processes on a shared machine then stretch neither the arrivals
nor the waits (they still slow the CPU itself, through its caches and a shared core: compare ratios).

Reported per trace: throughput (tokens generated / seconds from the first arrival to the last token)
of each policy; per round, auto ÷ the better fixed mode (target >= 0.97), auto ÷ off (target on the
skewed trace >= 1.2) and auto ÷ turns-merged, medians over the rounds; waits from arrival to the first token (p50, p99, max,
and over the minority adapters' requests), and auto's longest wait ÷ off's p99 wait in the worst round
(target <= 2). Then the cost of merging and of unmerging per model size (the embedded model and Llama
models of hidden --sizes, 8 layers, built in-process; an r=16 all-linear adapter), and
--cycles merge/unmerge cycles on a small model, after which the base weights must be bit-identical and
the greedy tokens those of the unmerged path.

    python benchmarks/switching.py [--rounds 3] [--json benchmarks/latest_switching.json]
    python benchmarks/switching.py --quick
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward_vs_peft import machine_info  # noqa: E402
from serve_vs_peft import make_adapters  # noqa: E402

from lorakit.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from lorakit.engine.requests import RequestHandle  # noqa: E402
from lorakit.engine.switching import Switching  # noqa: E402
from lorakit.models import load_model, load_tokenizer  # noqa: E402

TARGETS = {"auto_vs_best_fixed": 0.97, "auto_vs_off_skewed": 1.2, "max_wait_vs_off_p99": 2.0}
MODES = ("off", "merged", "auto")
ADAPTERS = 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 48 requests, 1 round, no larger models")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=400,
                   help="requests per trace (default: 400; shorter traces are mostly ramp-up and tail)")
    p.add_argument("--reference", action="store_true", help="also run dLoRA's merge-only policy (turns-merged)")
    p.add_argument("--rank", type=int, default=64, help="rank of the 16 all-linear adapters (default: 64)")
    p.add_argument("--load", type=float, default=2.0,
                   help="arrival rate as a multiple of what the unmerged engine sustains (default: 2)")
    p.add_argument("--max-hold", type=float, default=None,
                   help="the engine's switching_max_hold in seconds (default: the engine's, 8 requests' decode time)")
    p.add_argument("--cycles", type=int, default=10_000, help="merge/unmerge cycles of the exactness check")
    p.add_argument("--sizes", default="512,1024",
                   help="hidden sizes of the Llama models whose merge cost is measured, beside the embedded model's "
                        "(default: 512,1024; 2048 adds a 438M model, about a minute)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the figures here")
    return p.parse_args(argv)


# --- traces ------------------------------------------------------------------------------------------
def make_trace(kind: str, count: int, vocab: int, seed: int) -> list[dict]:
    """Requests with unit-rate exponential gaps (scaled to a rate at run time), prompts and lengths."""
    rng = random.Random(f"{kind}-{seed}")
    trace, clock = [], 0.0
    for _ in range(count):
        clock += rng.expovariate(1.0)
        if kind == "skewed":
            adapter = 0 if rng.random() < 0.9 else rng.randrange(1, ADAPTERS)
        else:
            adapter = rng.randrange(ADAPTERS)
        trace.append({"at": clock, "adapter": f"a{adapter}", "max_tokens": rng.randint(16, 48),
                      "prompt": [rng.randrange(3, vocab) for _ in range(rng.randint(8, 32))]})
    return trace


class CpuClock:
    """The run's clock: the CPU time this thread has spent stepping the engine, plus the idle gaps before
    arrivals. Other processes on a shared machine then move neither the arrivals nor the waits."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def set_mode(engine: Engine, mode: str, max_hold: Optional[float], clock=time.monotonic) -> None:
    """A fresh policy object of `mode` (nothing measured carried over from the previous run), timing steps
    in this thread's CPU time."""
    engine.scheduler.switching = Switching(mode, engine.runner, engine.slots, engine.adapter_cache.is_current,
                                           engine.config.max_running, max_hold, clock=clock, timer=time.thread_time)


def serve_trace(engine: Engine, trace: list[dict], rate: float, mode: str, max_hold: Optional[float]) -> dict:
    """Serve `trace` (rate: requests per second) stepping the engine on this thread, on a CpuClock: each
    request is submitted once the clock passes its arrival; throughput and waits (arrival to first token)."""
    clock = CpuClock()
    set_mode(engine, mode, max_hold, clock)
    scheduler = engine.scheduler
    handles, first_token, arrived, wall = [], {}, 0, 0.0
    while arrived < len(trace) or scheduler.has_work:
        while arrived < len(trace) and trace[arrived]["at"] / rate <= clock.now:
            request = trace[arrived]
            params = SamplingParams(max_tokens=request["max_tokens"], temperature=0, ignore_eos=True)
            handles.append(engine.submit(request["prompt"], params, request["adapter"]))
            arrived += 1
        scheduler.waiting.extend(engine._take_inbox())
        if not scheduler.has_work:
            clock.now = trace[arrived]["at"] / rate  # idle until the next arrival
            continue
        cpu, start = time.thread_time(), time.perf_counter()
        scheduler.step()
        clock.now += time.thread_time() - cpu
        wall += time.perf_counter() - start
        for i, handle in enumerate(handles):
            if i not in first_token and handle.first_token_at is not None:
                first_token[i] = clock.now
    results = [h.result() for h in handles]
    tokens = sum(len(r.token_ids) for r in results)
    waits = [first_token[i] - request["at"] / rate for i, request in enumerate(trace)]
    stats = scheduler.switching.stats
    return {"seconds": clock.now, "wall_seconds": wall, "tokens": tokens, "tokens_per_second": tokens / clock.now,
            "waits": waits, "minority_waits": [w for w, r in zip(waits, trace) if r["adapter"] != "a0"],
            "switches": stats.switches, "merged_share": stats.merged_seconds / clock.now,
            "merges_built": stats.merges_built, "hold": scheduler.switching.hold(),
            "tokens_of": [r.token_ids for r in results]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


# --- merge cost per model size -----------------------------------------------------------------------
def merge_cost(model, tokenizer, folder: str, repeats: int = 5) -> dict:
    """ms to build the merged weights of an r=16 all-linear adapter, and to switch back to the base."""
    engine = Engine(EngineConfig(max_running=1, max_model_len=64, switching="off"), model=model,
                    tokenizer=tokenizer)
    engine.add_adapter("a", make_adapters(model, 1, 16, folder)[0])
    info = engine.adapter_cache.lookup("a")
    slot = engine.adapter_cache.acquire(info)
    row = SimpleNamespace(adapters=((info, 1.0),), row_pairs=((slot, 1.0),))
    switching = engine.scheduler.switching
    merge, unmerge = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        weights = switching.merged(row.adapters, row.row_pairs)  # merge: W + s·BA of the adapted groups, new memory
        merge.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert switching.weights([row]) is None  # unmerge: the next step runs on the kept base weights
        switching._copy = (None, None)  # and the merged copy is let go (as when another adapter merges)
        unmerge.append(time.perf_counter() - start)
    copy_bytes = sum((p.packed if p.packed is not None else p.weight).nbytes
                     for layer, base in zip(weights, engine.runner.base_weights)
                     for group, p in layer.items() if p is not base[group])
    return {"params": sum(p.numel() for p in model.parameters()), "hidden": model.config.hidden_size,
            "layers": model.config.num_hidden_layers, "form": engine.runner.form,
            "merge_ms": 1e3 * statistics.median(merge), "unmerge_ms": 1e3 * statistics.median(unmerge),
            "merged_copy_mb": copy_bytes / 2**20}


def llama(hidden: int, layers: int = 8):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=8000)
    return LlamaForCausalLM(config).eval()


# --- exactness after many cycles -----------------------------------------------------------------------
def cycles_exact(tokenizer, folder: str, cycles: int) -> dict:
    """Merge two adapters alternately `cycles` times (each merge a new build, each followed by unmerged
    steps); then the base weights must be bit-identical and greedy tokens equal the unmerged path's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    engine = Engine(EngineConfig(max_running=4, max_model_len=64, switching="off"), model=model,
                    tokenizer=tokenizer)
    for i, path in enumerate(make_adapters(model, 2, 8, folder)):
        engine.add_adapter(f"a{i}", path)
    before = snapshot(engine)
    prompts = [[5, 6, 7, i] for i in range(4)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def generate(mode: str) -> list[list[int]]:
        set_mode(engine, mode, 1.0)
        handles = [engine.submit(ids, params, f"a{i % 2}") for i, ids in enumerate(prompts)]
        engine.run_until_idle()
        return [h.result().token_ids for h in handles]

    unmerged = generate("off")
    rows = []
    for name in ("a0", "a1"):
        info = engine.adapter_cache.lookup(name)
        rows.append(SimpleNamespace(adapters=((info, 1.0),), row_pairs=((engine.adapter_cache.acquire(info), 1.0),)))
    switching = engine.scheduler.switching
    start = time.perf_counter()
    for i in range(cycles):
        row = rows[i % 2]
        switching.merged(row.adapters, row.row_pairs)  # merge (a new build: the other adapter's copy was let go)
        assert switching.weights([row]) is None        # unmerge: an unmerged step runs on the kept base
    seconds = time.perf_counter() - start
    for row in rows:
        for slot, _ in row.row_pairs:
            engine.adapter_cache.release(slot)
    identical = all(torch.equal(a, b) for a, b in zip(before, snapshot(engine)))
    return {"cycles": cycles, "seconds": seconds, "merges_built": switching.stats.merges_built,
            "base_bit_identical": identical,
            "greedy_equal_unmerged": generate("turns-merged") == unmerged == generate("off")}


def snapshot(engine: Engine) -> list[torch.Tensor]:
    """Copies of every base tensor a step can read: the fused weights, biases, packed copies, the model's."""
    tensors = [t for layer in engine.runner.base_weights for p in layer.values()
               for t in (p.weight, p.bias, p.packed) if t is not None]
    return [t.to_dense() if t.is_mkldnn else t.clone() for t in tensors + list(engine.model.state_dict().values())]


# --- the figures ---------------------------------------------------------------------------------------
def summarize(runs: dict[str, list[dict]], rate: float) -> dict:
    """Per mode: medians over rounds and waits pooled over rounds; per round: auto against the fixed modes
    of the same round (run next to each other, so a slow spell of the machine hits them alike)."""
    modes = {}
    for mode, mode_runs in runs.items():
        waits = [w for run in mode_runs for w in run["waits"]]
        minority = [w for run in mode_runs for w in run["minority_waits"]]
        modes[mode] = {"tokens_per_second": [run["tokens_per_second"] for run in mode_runs],
                       "wait_p50": percentile(waits, 50), "wait_p99": percentile(waits, 99), "wait_max": max(waits),
                       "minority_wait_p99": percentile(minority, 99) if minority else None,
                       "minority_wait_max": max(minority) if minority else None,
                       "switches": statistics.median(run["switches"] for run in mode_runs),
                       "merged_share": statistics.median(run["merged_share"] for run in mode_runs),
                       "hold_seconds": statistics.median(run["hold"] for run in mode_runs)}
    rounds = []
    for i, (off, merged, auto) in enumerate(zip(runs["off"], runs["merged"], runs["auto"])):
        best = max(off["tokens_per_second"], merged["tokens_per_second"])
        rounds.append({"auto_vs_best_fixed": auto["tokens_per_second"] / best,
                       "auto_vs_off": auto["tokens_per_second"] / off["tokens_per_second"],
                       "max_wait_vs_off_p99": max(auto["waits"]) / percentile(off["waits"], 99)})
        if "turns-merged" in runs:
            rounds[-1]["auto_vs_turns_merged"] = auto["tokens_per_second"] / runs["turns-merged"][i]["tokens_per_second"]
    ratios = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key != "max_wait_vs_off_p99"}
    ratios["max_wait_vs_off_p99"] = max(r["max_wait_vs_off_p99"] for r in rounds)
    same = all(run["tokens_of"] == runs["off"][0]["tokens_of"] for mode_runs in runs.values() for run in mode_runs)
    return {"arrival_rate": rate, "modes": modes, "rounds": rounds, "ratios": ratios,
            "greedy_tokens_equal_across_modes": same}


def print_trace(kind: str, figures: dict, args) -> bool:
    """The trace's table and verdicts; whether every target is met."""
    print(f"\n{kind} trace: {args.requests} requests at {figures['arrival_rate']:.1f}/s, {args.rounds} rounds; greedy "
          f"tokens equal across modes and rounds: {figures['greedy_tokens_equal_across_modes']}")
    print(f"{'policy':<14}{'tok/s':>8}{'wait p50':>10}{'p99':>8}{'max':>8}{'minority p99':>14}{'max':>8}"
          f"{'switches':>10}{'merged':>8}")
    for mode, f in figures["modes"].items():
        minority = (f"{f['minority_wait_p99']:>14.2f}{f['minority_wait_max']:>8.2f}"
                    if f["minority_wait_p99"] is not None else f"{'-':>14}{'-':>8}")
        print(f"{mode:<14}{statistics.median(f['tokens_per_second']):>8.0f}{f['wait_p50']:>10.2f}{f['wait_p99']:>8.2f}"
              f"{f['wait_max']:>8.2f}{minority}{f['switches']:>10.0f}{f['merged_share']:>8.0%}")
    ratios = figures["ratios"]
    checks = [("auto / better fixed mode (median of rounds)", ratios["auto_vs_best_fixed"], ">=",
               TARGETS["auto_vs_best_fixed"])]
    if kind == "skewed":
        checks.append(("auto / off (median of rounds)", ratios["auto_vs_off"], ">=", TARGETS["auto_vs_off_skewed"]))
    else:
        print(f"auto / off (median of rounds): {ratios['auto_vs_off']:.2f}")
    if "auto_vs_turns_merged" in ratios:
        print(f"auto / turns-merged, the reference (median of rounds): {ratios['auto_vs_turns_merged']:.2f}")
    checks.append(("auto's longest wait / off's p99 wait (worst round)", ratios["max_wait_vs_off_p99"], "<=",
                   TARGETS["max_wait_vs_off_p99"]))
    ok = True
    for name, value, sense, target in checks:
        met = value >= target if sense == ">=" else value <= target
        ok &= met
        print(f"{name}: {value:.2f} (target {sense} {target}) {'ok' if met else 'MISSED'}")
    return ok


# --- the run -------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable] + sys.argv) if argv is None else shlex.join(argv)
    if args.quick:
        args.rounds, args.requests, args.cycles = 1, 48, 500
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(None)
    base = load_model(None)
    workdir = tempfile.mkdtemp(prefix="switching-bench-")
    config = EngineConfig(max_running=16, max_queue=4096, max_model_len=128, max_loaded_adapters=ADAPTERS,
                          switching_max_hold=args.max_hold)
    max_hold = config.switching_max_hold
    engine = Engine(config, model=copy.deepcopy(base), tokenizer=tokenizer)
    for i, path in enumerate(make_adapters(base, ADAPTERS, args.rank, os.path.join(workdir, "adapters"))):
        engine.add_adapter(f"a{i}", path)
    print(f"engine: the embedded model ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M), {ADAPTERS} adapters "
          f"r={args.rank} all-linear, 16 rows, {args.threads} thread(s), projections '{engine.runner.form}', "
          f"LoRA on the {engine.slots.path} path, switching_max_hold "
          f"{'the default (8 requests measured)' if max_hold is None else f'{max_hold:g} s'}")

    traces = {kind: make_trace(kind, args.requests, base.config.vocab_size, args.seed) for kind in ("skewed", "uniform")}
    rates = {}
    for kind, trace in traces.items():  # warm up every mode, and measure what unmerged sustains (all at once)
        for mode in MODES:
            serve_trace(engine, trace[:32], 1e9, mode, max_hold)
        closed = serve_trace(engine, trace[:96] if not args.quick else trace[:48], 1e9, "off", max_hold)
        mean_tokens = statistics.mean(r["max_tokens"] for r in trace)
        rates[kind] = args.load * closed["tokens_per_second"] / mean_tokens
        print(f"{kind}: unmerged sustains {closed['tokens_per_second']:.0f} tok/s; arrivals at {rates[kind]:.1f} "
              f"requests/s ({args.load:g}x)")

    modes = MODES + (("turns-merged",) if args.reference else ())
    runs = {kind: {mode: [] for mode in modes} for kind in traces}
    for r in range(args.rounds):
        for kind, trace in traces.items():
            for mode in modes[r % len(modes):] + modes[:r % len(modes)]:  # no policy always runs first
                runs[kind][mode].append(serve_trace(engine, trace, rates[kind], mode, max_hold))
            line = "  ".join(f"{m} {runs[kind][m][-1]['tokens_per_second']:.0f}" for m in modes)
            print(f"round {r + 1} {kind}: tok/s {line}", flush=True)

    report, ok = {}, True
    for kind in traces:
        report[kind] = summarize(runs[kind], rates[kind])
        ok &= print_trace(kind, report[kind], args)

    print("\nmerge / unmerge cost, r=16 all-linear adapter (median of 5)")
    hidden = [] if args.quick else [int(h) for h in args.sizes.split(",") if h]
    sizes = [("embedded", load_model(None))] + [(f"hidden {h}", llama(h)) for h in hidden]
    costs = {}
    for name, model in sizes:
        costs[name] = merge_cost(model, tokenizer, os.path.join(workdir, name.replace(" ", "")))
        c = costs[name]
        print(f"{name:<12}{c['params'] / 1e6:>8.1f}M params  merge {c['merge_ms']:8.2f} ms  unmerge "
              f"{c['unmerge_ms']:.4f} ms  merged copy {c['merged_copy_mb']:.1f} MiB ('{c['form']}' projections)")
        del model

    exact = cycles_exact(tokenizer, os.path.join(workdir, "cycles"), args.cycles)
    ok &= exact["base_bit_identical"] and exact["greedy_equal_unmerged"]
    print(f"\n{exact['cycles']:,} merge/unmerge cycles ({exact['merges_built']:,} merges built, {exact['seconds']:.1f} s): "
          f"base weights bit-identical: {exact['base_bit_identical']}; greedy tokens equal the unmerged path's: "
          f"{exact['greedy_equal_unmerged']}")
    print(f"command: {command}")
    if args.json:
        figures = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                   "machine": {**machine_info("cpu", args.threads), "load_average_at_end": os.getloadavg()},
                   "setup": {"model": "embedded", "adapters": ADAPTERS, "rank": args.rank, "targets": "all-linear",
                             "requests": args.requests, "load": args.load, "rounds": args.rounds,
                             "max_running": 16, "switching_max_hold": max_hold, "projection_form": engine.runner.form,
                             "lora_path": engine.slots.path},
                   "targets": TARGETS, "traces": report, "merge_cost": costs, "cycles": exact}
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
