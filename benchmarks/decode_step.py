#!/usr/bin/env python
"""Where a decode step's time goes: one stream against two streams on two adapters, in the engine's process.

An engine on the embedded model (one thread, as `lorakit serve` runs it; `--switching merged`, so a batch
on one adapter runs on merged weights as "auto" chooses for a lone stream) decodes 128 greedy tokens for

    base        one stream on the base model
    merged      one stream on adapter alpha (merged: no LoRA work)
    base pair   two streams on the base model
    pair        alpha and beta at once (two r=8 all-linear adapters: unmerged, each row its own LoRA)

in alternating rounds. The engine's parts are timed by wrapping them (a few microseconds of overhead a
call): the base projections (`Projection`), the LoRA update (`SlotLora.apply`), the KV cache write, paged
attention, sampling with the tokens' hand-over (`_accept`); "other" is the rest of the step, mostly the
per-operation dispatch of the model's small tensor operations (norms, rotary embedding, activations, residual
adds). Medians of milliseconds per step, and the bound they set on two streams' rate over one's:
2 × merged ÷ pair.

    python benchmarks/decode_step.py [--rounds 16] [--tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from lorakit.engine import kv_cache, lora_kernel, paged_attention, projection, scheduler
from lorakit.engine.engine import Engine, EngineConfig
from lorakit.engine.sampling import SamplingParams
from playground import PROMPT, save_adapter  # this folder's benchmark: two random r=8 all-linear adapters

PARTS = {"projections": (projection.Projection, "__call__"), "lora": (lora_kernel.SlotLora, "apply"),
         "kv write": (kv_cache.KVCache, "write"), "attention": (paged_attention.PagedAttention, "__call__"),
         "sampling": (scheduler.Scheduler, "_accept")}
CASES = {"base": [None], "merged": ["alpha"], "base pair": [None, None], "pair": ["alpha", "beta"]}


def timed_parts() -> Counter:
    """Wrap each part's method so that its time adds up in the returned counter."""
    spent: Counter = Counter()
    for name, (owner, method) in PARTS.items():
        def timed(*args, _inner=getattr(owner, method), _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - start
        setattr(owner, method, timed)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    print("command: python benchmarks/decode_step.py " + " ".join(sys.argv[1:]))
    torch.set_num_threads(1)
    spent = timed_parts()
    with tempfile.TemporaryDirectory() as folder:
        engine = Engine(EngineConfig(threads=1, switching="merged"), own_process=True)
        engine.add_adapter("alpha", save_adapter(Path(folder) / "alpha", 0))
        engine.add_adapter("beta", save_adapter(Path(folder) / "beta", 1))
    ids = engine.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=args.tokens, temperature=0, seed=0, ignore_eos=True)
    per_step: dict[str, dict[str, list[float]]] = {case: defaultdict(list) for case in CASES}
    for round_ in range(args.rounds + 2):  # two rounds warm up (and build the merged copy)
        for case, names in CASES.items():
            for name in names:
                engine.submit(ids, params, name)
            spent.clear()
            start = time.perf_counter()
            engine.run_until_idle()
            step = (time.perf_counter() - start) * 1000 / args.tokens
            if round_ >= 2:
                per_step[case]["step"].append(step)
                for part in PARTS:
                    per_step[case][part].append(spent[part] * 1000 / args.tokens)
                per_step[case]["other"].append(step - sum(spent[part] for part in PARTS) * 1000 / args.tokens)
    columns = ["step", *PARTS, "other"]
    print(f"\nms per decode step, medians of {args.rounds} rounds of {args.tokens} tokens, one thread")
    print(f"{'':>10} " + " ".join(f"{c:>11}" for c in columns))
    medians = {case: {c: statistics.median(per_step[case][c]) for c in columns} for case in CASES}
    for case in CASES:
        print(f"{case:>10} " + " ".join(f"{medians[case][c]:11.2f}" for c in columns))
    print(f"\ntwo streams on two adapters over one: at most 2 x {medians['merged']['step']:.2f} / "
          f"{medians['pair']['step']:.2f} = {2 * medians['merged']['step'] / medians['pair']['step']:.2f}x")


if __name__ == "__main__":
    main()
