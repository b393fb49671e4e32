#!/usr/bin/env python
"""Multi-adapter serving over HTTP: `lorakit serve` at its default flags, against its own base model and
against the in-process engine, in one run, same inputs.

A real `lorakit serve` subprocess on loopback is given 16 adapters with `--adapter NAME=DIR` (random r=8
all-linear adapters, saved in fp32 as `lorakit train` saves them) and no other flag but --port. 16
concurrent users of the official `openai` client (AsyncOpenAI, `stream=True`) each send one request
after another (a 16-token prompt, 64 new tokens, greedy, `ignore_eos`), a closed loop as a server sees
in production:

  http base     every user on the base model
  http mixed    user i on adapter i
  engine base / engine mixed
                the same users submitting to an in-process `Engine` at its default config, after the
                server has stopped (the two never share the CPU)

Tokens/s is the tokens of the requests that finished within a --window seconds measuring window, over
the window (the users run on past it so that the load never drops inside it). User i starts i/16 of a
request's duration after user 0, so that requests end spread over time rather than in waves of 16 (a
wave falling just inside or outside the window would move the figure by 1/8). Each of --rounds rounds
measures base and mixed (order alternating); the median round counts.
Targets: http mixed / http base >= 0.9; http base / engine base >= 0.85.

    python benchmarks/serve_http.py [--rounds 5] [--model embedded] [--json benchmarks/latest_serve_http.json]
    python benchmarks/serve_http.py --hidden 512 --layers 8    # a random 33.5M Llama saved to a folder
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import select
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward_vs_peft import machine_info  # noqa: E402

import lorakit  # noqa: E402
from lorakit.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from lorakit.models import EMBEDDED_NAME, load_model, load_tokenizer  # noqa: E402

TARGETS = {"http_mixed_vs_http_base": 0.9, "http_base_vs_engine_base": 0.85}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--window", type=float, default=8.0, help="seconds of each measuring window")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, help="serve a random Llama of this width (saved to a folder) instead of "
                                              "the embedded model")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--serve-flag", action="append", default=[], help="an extra `lorakit serve` flag (repeatable)")
    p.add_argument("--json", help="write the figures here")
    return p.parse_args(argv)


def make_model_folder(args, workdir: str) -> str | None:
    """None for the embedded model, else a folder with a random Llama of --hidden width."""
    if not args.hidden:
        return None
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    folder = os.path.join(workdir, "model")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_adapters(model_folder: str | None, count: int, workdir: str) -> list[str]:
    base = load_model(model_folder)
    paths = []
    for i in range(count):
        model = load_model(model_folder) if i else base
        torch.manual_seed(100 + i)
        lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                      init_lora_weights="gaussian"))
        with torch.no_grad():  # B is zero after init; give the adapter a real update
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        paths.append(str(lorakit.save_adapter(model, os.path.join(workdir, f"a{i}"))))
    return paths


def start_server(model_folder: str | None, adapters: list[tuple[str, str]], extra: list[str]):
    command = [sys.executable, "-m", "lorakit.cli", "serve", "--port", "0",
               *([] if model_folder is None else ["--model", model_folder]),
               *[f"--adapter={name}={path}" for name, path in adapters], *extra]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if "http://" in line:
                return proc, line.split(" at ")[1].strip()
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"lorakit serve did not start:\n{proc.stderr.read()}")


def _schedule(window: float, stagger: float) -> tuple[float, float]:
    """(start, end) of the measuring window: after every user has started and the load is steady."""
    start = time.perf_counter() + stagger + 1.0
    return start, start + window


async def http_window(base_url: str, models: list[str], prompts: list[list[int]], new_tokens: int,
                      window: float, stagger: float) -> float:
    """Tokens/s of `len(models)` users streaming requests back to back, over a measuring window; user i
    starts i * stagger / len(models) seconds late."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    start, end = _schedule(window, stagger)
    finished = []

    async def user(i: int, model: str, prompt: list[int]) -> None:
        await asyncio.sleep(i * stagger / len(models))
        while time.perf_counter() < end:
            stream = await client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                                     stream=True, stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.usage is not None:
                    finished.append((time.perf_counter(), chunk.usage.completion_tokens))

    await asyncio.gather(*(user(i, m, p) for i, (m, p) in enumerate(zip(models, prompts))))
    await client.close()
    return sum(n for t, n in finished if start <= t < end) / window


def engine_window(engine: Engine, models: list[str | None], prompts: list[list[int]], new_tokens: int,
                  window: float, stagger: float) -> float:
    """The same closed loop against an in-process engine, one thread per user."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start, end = _schedule(window, stagger)
    finished = []

    def user(i, model, prompt) -> None:
        time.sleep(i * stagger / len(models))
        while time.perf_counter() < end:
            count = len(engine.submit(prompt, params, model).result(timeout=300).token_ids)
            finished.append((time.perf_counter(), count))

    threads = [threading.Thread(target=user, args=(i, *pair)) for i, pair in enumerate(zip(models, prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(n for t, n in finished if start <= t < end) / window


def timed(run, rounds: int, users: int, new_tokens: int) -> dict:
    """Warm up, then `rounds` rounds alternating base and mixed; the median round's tokens/s.
    run(kind, stagger) -> tokens/s; the warm-up's rate gives a request's duration, the users' stagger."""
    stagger = users * new_tokens / max(run("base", 0.0), 1.0)
    run("mixed", stagger)
    rates = {"base": [], "mixed": []}
    for r in range(rounds):
        for kind in (("base", "mixed") if r % 2 == 0 else ("mixed", "base")):
            rates[kind].append(run(kind, stagger))
    return {kind: statistics.median(values) for kind, values in rates.items()} | {"round_rates": rates}


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/serve_http.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    workdir = tempfile.mkdtemp(prefix="serve-http-")
    model_folder = make_model_folder(args, workdir)
    paths = make_adapters(model_folder, args.streams, workdir)
    names = [f"a{i}" for i in range(args.streams)]
    tokenizer = load_tokenizer(model_folder)
    torch.manual_seed(1)
    prompts = torch.randint(3, len(tokenizer), (args.streams, args.prompt_len)).tolist()
    threads = torch.get_num_threads()
    print(f"model: {model_folder or EMBEDDED_NAME}; {args.streams} streams x ({args.prompt_len} prompt + "
          f"{args.new_tokens} new) tokens; {args.streams} r=8 all-linear fp32 adapters; {threads} threads")

    proc, base_url = start_server(model_folder, list(zip(names, paths)), args.serve_flag)
    base_name = EMBEDDED_NAME if model_folder is None else os.path.basename(model_folder)
    try:
        def http(kind: str, stagger: float):
            models = [base_name] * args.streams if kind == "base" else names
            return asyncio.run(http_window(base_url, models, prompts, args.new_tokens, args.window, stagger))
        over_http = timed(http, args.rounds, args.streams, args.new_tokens)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    engine = Engine(EngineConfig(model=model_folder)).start()
    for name, path in zip(names, paths):
        engine.add_adapter(name, path)
    try:
        in_process = timed(lambda kind, stagger: engine_window(engine, [None] * args.streams if kind == "base" else names,
                                                               prompts, args.new_tokens, args.window, stagger),
                           args.rounds, args.streams, args.new_tokens)
    finally:
        engine.shutdown()

    ratios = {"http_mixed_vs_http_base": over_http["mixed"] / over_http["base"],
              "http_base_vs_engine_base": over_http["base"] / in_process["base"],
              "http_mixed_vs_engine_mixed": over_http["mixed"] / in_process["mixed"],
              "engine_mixed_vs_engine_base": in_process["mixed"] / in_process["base"]}
    print(f"\n{'contender':<16}{'tokens/s':>10}")
    for label, figures in (("http", over_http), ("engine", in_process)):
        for kind in ("base", "mixed"):
            print(f"{label + ' ' + kind:<16}{figures[kind]:>10.0f}")
    verdict = lambda ok: "ok" if ok else "MISSED"  # noqa: E731
    print(f"\nhttp mixed / http base     : {ratios['http_mixed_vs_http_base']:.2f}  (target >= 0.9) "
          f"{verdict(ratios['http_mixed_vs_http_base'] >= TARGETS['http_mixed_vs_http_base'])}")
    print(f"http base / engine base    : {ratios['http_base_vs_engine_base']:.2f}  (target >= 0.85) "
          f"{verdict(ratios['http_base_vs_engine_base'] >= TARGETS['http_base_vs_engine_base'])}")
    print(f"http mixed / engine mixed  : {ratios['http_mixed_vs_engine_mixed']:.2f}")
    print(f"engine mixed / engine base : {ratios['engine_mixed_vs_engine_base']:.2f}")
    print(f"command: {command}")
    if args.json:
        figures = {"command": command, "date": datetime.date.today().isoformat(), "machine": machine_info("cpu", threads),
                   "setup": {"model": model_folder or EMBEDDED_NAME, "users": args.streams, "window_s": args.window,
                             "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rank": 8,
                             "serve_flags": args.serve_flag},
                   "tokens_per_second": {"http": {k: over_http[k] for k in ("base", "mixed")},
                                         "engine": {k: in_process[k] for k in ("base", "mixed")}},
                   "ratios": ratios, "targets": TARGETS,
                   "round_tokens_per_second": {"http": over_http["round_rates"], "engine": in_process["round_rates"]}}
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
