#!/usr/bin/env python
"""The prefix cache (`engine/prefix_cache.py`): time to first token of a later turn with and without it,
and the resident memory of `lorakit serve` after start-up.

One in-process engine on the embedded model (fp32, 1 thread) per setting, prefix_cache on and off. A
conversation of --history random tokens is served once (the first turn, 8 new tokens); then, --rounds
times, the time to the first token of

    base turn    the history, the first answer and 16 new tokens, on the base model
    alora turn   the same history and answer plus an activated LoRA's invocation and 8 tokens, on an aLoRA
                 (r=8, every linear layer): with the cache its positions before the invocation are the
                 base turn's blocks

Medians are reported with the ratio no-cache ÷ cache, and the greedy tokens of both settings are checked
equal. --rss starts `lorakit serve --dtype fp32` on the embedded model (with --src, from another source
tree, e.g. an export of an older commit) and reports the resident memory of the server and its engine
process once /health answers.

    python benchmarks/prefix_cache.py [--history 900] [--rounds 5] [--rss] [--src DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lorakit
from lorakit.engine import Engine, EngineConfig, SamplingParams
from lorakit.models import load_model, load_tokenizer

INVOCATION = [300, 301, 302]


def first_token_seconds(engine: Engine, ids: list[int], adapter) -> tuple[float, int]:
    start = time.perf_counter()
    handle = engine.submit(ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), adapter)
    engine.run_until_idle()
    return time.perf_counter() - start, handle.result().token_ids[0]


def turns(args, alora_folder: str) -> None:
    torch.set_num_threads(1)
    model, tokenizer = load_model(None), load_tokenizer(None)
    history = torch.randint(400, 4000, (args.history,), generator=torch.Generator().manual_seed(0)).tolist()
    results = {}
    for cached in (True, False):
        engine = Engine(EngineConfig(dtype="fp32", prefix_cache=cached), model=copy.deepcopy(model),
                        tokenizer=tokenizer)
        engine.add_adapter("judge", alora_folder)
        first = engine.submit(history, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        engine.run_until_idle()
        conversation = history + first.result().token_ids
        base_turn = conversation + list(range(500, 516))
        alora_turn = conversation + INVOCATION + list(range(600, 608))
        times = {"base turn": [], "alora turn": []}
        tokens = {}
        for _ in range(args.rounds):
            for name, ids, adapter in (("base turn", base_turn, None), ("alora turn", alora_turn, "judge")):
                seconds, token = first_token_seconds(engine, ids, adapter)
                times[name].append(seconds)
                tokens[name] = token
        results[cached] = ({k: statistics.median(v) for k, v in times.items()}, tokens)
    assert results[True][1] == results[False][1], "the cache changed a greedy token"
    print(f"history {args.history} tokens, first token of the next turn (median of {args.rounds}), tokens equal:")
    for name in ("base turn", "alora turn"):
        with_cache, without = results[True][0][name], results[False][0][name]
        print(f"  {name:11s} cache {with_cache * 1000:8.1f} ms   no cache {without * 1000:8.1f} ms   "
              f"ratio {without / with_cache:6.1f}x")


def rss(src: str | None) -> None:
    import httpx
    import psutil

    env = dict(os.environ, **({"PYTHONPATH": str(Path(src).resolve())} if src else {}))
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "serve", "--port", "0", "--dtype", "fp32"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        url = None
        while url is None:
            line = proc.stdout.readline()
            if not line:
                raise SystemExit("lorakit serve did not start")
            if "http://" in line:
                url = line.split(" at ")[1].strip().removesuffix("/v1")
        for _ in range(100):
            if httpx.get(f"{url}/health").status_code == 200:
                break
            time.sleep(0.2)
        server = psutil.Process(proc.pid)
        engine = sum(child.memory_info().rss for child in server.children(recursive=True))
        print(f"lorakit serve RSS after start-up ({src or 'this tree'}): server {server.memory_info().rss / 2**20:.0f} "
              f"MiB + engine process {engine / 2**20:.0f} MiB = {(server.memory_info().rss + engine) / 2**20:.0f} MiB")
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--history", type=int, default=900)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rss", action="store_true")
    parser.add_argument("--src", help="the src folder of another source tree, for --rss")
    args = parser.parse_args()
    print("command: python benchmarks/prefix_cache.py " + " ".join(sys.argv[1:]))
    if args.rss:
        rss(args.src)
        return
    with tempfile.TemporaryDirectory() as folder:
        model = load_model(None)
        torch.manual_seed(3)
        lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                      init_lora_weights=False, alora_invocation_tokens=INVOCATION))
        lorakit.save_adapter(model, folder)
        turns(args, folder)


if __name__ == "__main__":
    main()
