#!/usr/bin/env python
"""Activated LoRA turns and the paged prefix cache: time to first token, prefill cost, decode speed, memory.

In-process engines on the embedded model (fp32, one thread; its position limit raised so conversations
can pass 1,024 tokens: RoPE has no learned positions, and only time is measured), an activated LoRA
(r=8, every linear layer) whose invocation is 3 tokens. Every figure is a median of --rounds, and every
pair of settings is checked to give the same greedy tokens.

    turns     a base conversation of H tokens is served (its first turn, 8 new tokens); then the time to
              the first token of the next turn, with the cache and without it (prefix_cache=False):
                base turn   history + answer + 16 new tokens, on the base model
                alora turn  history + answer + the invocation + 8 tokens, on the aLoRA: with the cache,
                            its positions before the invocation are the base turn's blocks
              and the second turn's first token against the first turn's (H = --chat-history)
    prefill   no cache: the aLoRA's prefill of a prompt of H tokens ending with its invocation against the
              base model's prefill of the same prompt (the aLoRA computes the positions before its
              invocation as the base, with no LoRA work)
    decode    16 requests (4 adapters and the base, 200-token prompts, 128 new tokens each) on this tree's
              paged cache, and with --contiguous-src on another source tree (the contiguous rows the
              engine had before), each in its own process, alternating; tokens per second of the whole run
    http      the aLoRA turn as a user gets it: `lorakit serve --dtype fp32` on the long model (its default
              flags otherwise; with the cache, and with --no-prefix-cache), the official openai client,
              text prompts: a conversation's base turn, then the aLoRA turn on it with the invocation
              appended by the server (alora_append_invocation); time to the first streamed token; each
              round a new conversation of about H tokens
    --rss     `lorakit serve --dtype fp32` on the embedded model: resident memory of the server and its
              engine process once /health answers, beside the weights' bytes

    python benchmarks/alora.py [--history 1500] [--chat-history 1000] [--rounds 5]
                               [--contiguous-src DIR] [--http] [--rss] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import lorakit
from lorakit.engine import Engine, EngineConfig, SamplingParams
from lorakit.models import load_model, load_tokenizer

INVOCATION = [300, 301, 302]
POSITIONS = 4096


def long_model():
    model = load_model(None)
    model.config.max_position_embeddings = POSITIONS
    return model


def engine_for(model, tokenizer, adapters: dict, **config) -> Engine:
    engine = Engine(EngineConfig(dtype="fp32", **config), model=copy.deepcopy(model), tokenizer=tokenizer)
    for name, folder in adapters.items():
        engine.add_adapter(name, folder)
    return engine


def first_token(engine: Engine, ids: list[int], adapter) -> tuple[float, int]:
    start = time.perf_counter()
    handle = engine.submit(ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), adapter)
    engine.run_until_idle()
    return time.perf_counter() - start, handle.result().token_ids[0]


def random_ids(count: int, seed: int) -> list[int]:
    return torch.randint(400, 4000, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def turns(model, tokenizer, adapters, history_length: int, rounds: int) -> dict:
    history = random_ids(history_length, 0)
    results = {}
    for cached in (True, False):
        times = {"first turn": [], "base turn": [], "alora turn": []}
        tokens = {}
        engine = engine_for(model, tokenizer, adapters, prefix_cache=cached)
        for r in range(rounds):
            engine.prefix.clear()  # every round's first turn starts from an empty cache
            seconds, _ = first_token(engine, history, None)
            times["first turn"].append(seconds)
            first = engine.submit(history, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
            engine.run_until_idle()
            conversation = history + first.result().token_ids
            for name, ids, adapter in (("base turn", conversation + list(range(500, 516)), None),
                                       ("alora turn", conversation + INVOCATION + list(range(600, 608)), "judge")):
                seconds, token = first_token(engine, ids, adapter)
                times[name].append(seconds)
                tokens[name] = token
        results[cached] = ({k: statistics.median(v) for k, v in times.items()}, tokens)
    assert results[True][1] == results[False][1], "the cache changed a greedy token"
    cache, plain = results[True][0], results[False][0]
    return {"history": history_length,
            "cache_ms": {k: round(v * 1000, 1) for k, v in cache.items()},
            "no_cache_ms": {k: round(v * 1000, 1) for k, v in plain.items()},
            "alora_turn_speedup": round(plain["alora turn"] / cache["alora turn"], 1),
            "base_turn_speedup": round(plain["base turn"] / cache["base turn"], 1),
            "second_turn_vs_first": round(cache["first turn"] / cache["base turn"], 1)}


def prefill(model, tokenizer, adapters, length: int, rounds: int) -> dict:
    ids = random_ids(length - len(INVOCATION), 1) + INVOCATION
    engine = engine_for(model, tokenizer, adapters, prefix_cache=False)
    first_token(engine, ids, "judge")  # warm
    times = {"base": [], "alora": []}
    for _ in range(rounds):
        for name, adapter in (("base", None), ("alora", "judge")):
            times[name].append(first_token(engine, ids, adapter)[0])
    base, alora = statistics.median(times["base"]), statistics.median(times["alora"])
    return {"prompt": length, "base_ms": round(base * 1000, 1), "alora_ms": round(alora * 1000, 1),
            "alora_vs_base": round(alora / base, 3)}


DECODE_SCRIPT = """
import json, sys, time, torch
from lorakit.engine import Engine, EngineConfig, SamplingParams
from lorakit.models import load_model, load_tokenizer
torch.set_num_threads(1)
folders = json.loads(sys.argv[1])
engine = Engine(EngineConfig(dtype="fp32"), model=load_model(None), tokenizer=load_tokenizer(None))
for i, folder in enumerate(folders):
    engine.add_adapter(f"a{i}", folder)
params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
prompts = [torch.randint(400, 4000, (200,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(16)]
adapters = [None if i % 5 == 4 else f"a{i % 5}" for i in range(16)]
def run():
    start = time.perf_counter()
    handles = [engine.submit(p, params, a) for p, a in zip(prompts, adapters)]
    engine.run_until_idle()
    tokens = [h.result().token_ids for h in handles]
    return sum(map(len, tokens)) / (time.perf_counter() - start), tokens
run()
rate, tokens = run()
print(json.dumps({"tokens_per_second": rate, "tokens": tokens}))
"""


def decode(folders: list[str], src: str | None, rounds: int) -> dict:
    trees = {"paged": str(Path(__file__).resolve().parents[1] / "src")}
    if src:
        trees["contiguous"] = str(Path(src).resolve())
    rates = {name: [] for name in trees}
    outputs = {}
    for _ in range(rounds):
        for name, path in trees.items():
            env = dict(os.environ, PYTHONPATH=path)
            out = subprocess.run([sys.executable, "-c", DECODE_SCRIPT, json.dumps(folders)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            rates[name].append(result["tokens_per_second"])
            outputs[name] = result["tokens"]
    report = {name: round(statistics.median(r), 1) for name, r in rates.items()}
    if src:
        report["paged_vs_contiguous"] = round(report["paged"] / report["contiguous"], 3)
        report["tokens_equal"] = outputs["paged"] == outputs["contiguous"]
    return report


def http_first_token(client, model: str, prompt, **extra) -> tuple[float, str]:
    """Seconds to the first streamed token of a greedy completion of `prompt`, and that token's text."""
    start = time.perf_counter()
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True, **extra})
    seconds, text = None, ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            seconds = seconds or time.perf_counter() - start
            text += chunk.choices[0].text
    return seconds, text


def http_turns(model, tokenizer, judge: str, history_length: int, rounds: int, workdir: Path) -> dict:
    """The aLoRA turn over HTTP, as a client sends it, with the cache and without: a conversation is text
    (random tokens' text, about `history_length` tokens); its base turn (8 tokens), then the aLoRA turn on the
    conversation so far with `alora_append_invocation` (the server appends the invocation); time to the first
    streamed token of the aLoRA turn, and of a new conversation's first turn for comparison."""
    from openai import OpenAI

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve_http import start_server

    folder = workdir / "long_model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    histories = [tokenizer.decode(random_ids(history_length, 100 + r)) for r in range(rounds + 1)]  # 0 warms up
    new_conversations = [tokenizer.decode(random_ids(history_length, 200 + r)) for r in range(rounds + 1)]
    results = {}
    for cached in (True, False):
        flags = ["--dtype", "fp32", "--max-model-len", str(POSITIONS), *([] if cached else ["--no-prefix-cache"])]
        proc, url = start_server(str(folder), [("judge", judge)], flags)
        try:
            client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
            base = next(m.id for m in client.models.list().data if m.id != "judge")
            times, texts, prompt_tokens = {"first turn": [], "alora turn": []}, [], []
            for r, history in enumerate(histories):
                first = client.completions.create(model=base, prompt=history, max_tokens=8, temperature=0,
                                                  extra_body={"ignore_eos": True})
                seconds, text = http_first_token(client, "judge", history + first.choices[0].text,
                                                 alora_append_invocation=True)
                fresh, _ = http_first_token(client, base, new_conversations[r])
                if r:
                    times["alora turn"].append(seconds)
                    times["first turn"].append(fresh)
                    texts.append(text)
                    prompt_tokens.append(first.usage.prompt_tokens)
            results[cached] = ({k: statistics.median(v) for k, v in times.items()}, texts, prompt_tokens)
        finally:
            proc.terminate()
            proc.wait(30)
    assert results[True][1] == results[False][1], "the cache changed a greedy token over HTTP"
    cache, plain = results[True][0], results[False][0]
    return {"history_tokens": statistics.median(results[True][2]),
            "cache_ms": {k: round(v * 1000, 1) for k, v in cache.items()},
            "no_cache_ms": {k: round(v * 1000, 1) for k, v in plain.items()},
            "alora_turn_speedup": round(plain["alora turn"] / cache["alora turn"], 1),
            "alora_turn_vs_a_new_conversation": round(cache["first turn"] / cache["alora turn"], 1)}


def rss() -> dict:
    import httpx
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "serve", "--port", "0", "--dtype", "fp32"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
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
        time.sleep(2)
        server = psutil.Process(proc.pid)
        engine = sum(child.memory_info().rss for child in server.children(recursive=True))
        weights = sum(p.numel() * p.element_size() for p in load_model(None).parameters())
        return {"server_mib": round(server.memory_info().rss / 2**20), "engine_mib": round(engine / 2**20),
                "weights_mib": round(weights / 2**20, 1)}
    finally:
        proc.terminate()
        proc.wait(30)


def save_adapters(folder: Path) -> dict:
    folders = {}
    for name, seed, extra in (("judge", 3, {"alora_invocation_tokens": INVOCATION}), ("a0", 10, {}), ("a1", 11, {}),
                              ("a2", 12, {}), ("a3", 13, {})):
        model = load_model(None)
        torch.manual_seed(seed)
        lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                      init_lora_weights=False, **extra))
        lorakit.save_adapter(model, folder / name)
        folders[name] = str(folder / name)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--history", type=int, default=1500)
    parser.add_argument("--chat-history", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--contiguous-src", help="the src folder of a tree with the contiguous KV rows, for decode")
    parser.add_argument("--rss", action="store_true")
    parser.add_argument("--http", action="store_true", help="also time the aLoRA turn over HTTP")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    command = "python benchmarks/alora.py " + " ".join(sys.argv[1:])
    print(f"command: {command}")
    torch.set_num_threads(1)
    report = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M+00:00"),
              "machine": {"cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
                          "torch": torch.__version__, "load_average_at_start": os.getloadavg()}}
    model, tokenizer = long_model(), load_tokenizer(None)
    with tempfile.TemporaryDirectory() as folder:
        folders = save_adapters(Path(folder))
        judge = {"judge": folders["judge"]}
        report["turns"] = turns(model, tokenizer, judge, args.history, args.rounds)
        print(json.dumps({"turns": report["turns"]}))
        report["chat"] = turns(model, tokenizer, judge, args.chat_history, args.rounds)
        print(json.dumps({"chat": report["chat"]}))
        report["prefill"] = prefill(model, tokenizer, judge, args.history, args.rounds)
        print(json.dumps({"prefill": report["prefill"]}))
        if args.http:
            report["http"] = http_turns(model, tokenizer, folders["judge"], args.history, args.rounds, Path(folder))
            print(json.dumps({"http": report["http"]}))
        report["decode"] = decode([folders[f"a{i}"] for i in range(4)], args.contiguous_src, max(3, args.rounds // 2))
        print(json.dumps({"decode": report["decode"]}))
    if args.rss:
        report["rss"] = rss()
        print(json.dumps({"rss": report["rss"]}))
    report["machine"]["load_average_at_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
