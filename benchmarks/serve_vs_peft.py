#!/usr/bin/env python
"""Multi-adapter decoding: the lorakit engine against PEFT and transformers, in one run, same inputs.

A batch of 16 sequences (random prompts of 16 tokens, 64 new tokens each, greedy, no early stop) on a
LlamaForCausalLM built in-process (hidden 512, 8 layers, vocab 8000: ~33.5M parameters), every contender
holding the same weights in the same dtype (--dtype fp32 or bf16):

  lorakit base      the engine, no adapter on any row
  lorakit mixed     the engine, row i on adapter i (16 distinct r=8 all-linear adapters)
  lorakit single    the engine, every row on adapter 0 (unmerged), and with switching="merged" (merged weights)
  lorakit mixed bf16 files
                    with fp32 adapters (the default --adapter-dtype): the same 16 adapters saved in bf16,
                    which the engine holds in bf16 exactly (half the bytes a decode step reads)
  hf base           transformers' model.generate on the bare model
  peft mixed        PEFT's model.generate(..., adapter_names=[...]) with the same 16 adapters

Targets: lorakit mixed / lorakit base >= 0.9 (tokens/s); lorakit mixed / peft mixed >= 4;
lorakit base / hf base >= 2. Before timing, the engine's mixed-batch tokens are checked against PEFT's
(row by row) and against the engine running each request alone.

Adapter cold start: from `add_adapter` (files on disk, not resident) to the first token of a request on
it, for an r=16 all-linear adapter of the same model, with the engine thread running; target <= 100 ms.

Timing: every contender is warmed up, then all run in each round (order alternating) for --rounds
rounds; rounds in which other processes used the CPU are redone (see forward_vs_peft.py). Reported:
tokens/s from the median round, and ratios of medians.

    python benchmarks/serve_vs_peft.py [--rounds 5] [--json benchmarks/latest_serve_vs_peft.json]
    python benchmarks/serve_vs_peft.py --quick
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
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward_vs_peft import machine_info, model_config, time_pair  # noqa: E402

import lorakit  # noqa: E402
from lorakit.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from lorakit.models import load_tokenizer  # noqa: E402

TARGETS = {"mixed_vs_base": 0.9, "mixed_vs_peft": 4.0, "base_vs_transformers": 2.0, "cold_start_ms": 100.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 2 rounds")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=0, help="build a larger Llama: hidden size (intermediate 2.6875x)")
    p.add_argument("--layers", type=int, default=0, help="with --hidden: number of layers (default 8)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="weights of every contender (the engine, transformers and PEFT alike)")
    p.add_argument("--adapter-dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="dtype the adapters are saved in; the engine keeps 16-bit adapters in 16 bits (exactly) and "
                        "fp32 ones in fp32, unless --engine-adapter-dtype says otherwise")
    p.add_argument("--engine-adapter-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="the engine's adapter_dtype (bf16 rounds fp32 adapters)")
    p.add_argument("--json", help="write the figures here")
    return p.parse_args(argv)


def make_adapters(base, count: int, rank: int, folder: str, dtype: torch.dtype = torch.float32) -> list[str]:
    """Random r-rank all-linear adapters saved in `dtype` (bf16: as an adapter trained in bf16 is saved)."""
    paths = []
    for i in range(count):
        model = copy.deepcopy(base)
        torch.manual_seed(100 + i)
        lorakit.add_adapter(model, lorakit.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                      init_lora_weights=False))
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(dtype)
        paths.append(lorakit.save_adapter(model, os.path.join(folder, f"r{rank}-{i}")))
    return [str(p) for p in paths]


def engine_runner(engine: Engine, prompts: list[list[int]], adapters: list, new_tokens: int):
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)

    def run() -> list[list[int]]:
        handles = [engine.submit(ids, params, adapter) for ids, adapter in zip(prompts, adapters)]
        engine.run_until_idle()
        return [h.result().token_ids for h in handles]
    return run


def generate_runner(model, prompts: torch.Tensor, new_tokens: int, **kwargs):
    def run() -> list[list[int]]:
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
        return out[:, prompts.shape[1]:].tolist()
    return run


def cold_start_ms(base, tokenizer, folder: str, device: str, trials: int = 5) -> list[float]:
    """add_adapter -> first token, r=16 all-linear, engine thread running and idle."""
    paths = make_adapters(base, trials, 16, folder)
    engine = Engine(EngineConfig(max_running=4, max_loaded_adapters=2, max_model_len=128),
                    model=copy.deepcopy(base), tokenizer=tokenizer).start()
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    engine.submit([5] * 16, params, None).result()  # warm the engine thread
    times = []
    for i, path in enumerate(paths):
        start = time.perf_counter()
        engine.add_adapter(f"cold{i}", path)
        handle = engine.submit([5] * 16, params, f"cold{i}")
        next(handle.events())
        times.append((time.perf_counter() - start) * 1e3)
    engine.shutdown()
    return times


def http_cold_start_ms(base, tokenizer, folder: str, dtype: str, trials: int = 5) -> list[float]:
    """The same through `lorakit serve`: POST /v1/load_lora_adapter, then a streamed completion's first chunk."""
    import select
    import signal
    import subprocess

    import httpx

    model_dir = os.path.join(folder, "model")
    base.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    paths = make_adapters(base, trials, 16, os.path.join(folder, "http"))
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "serve", "--model", model_dir, "--port", "0",
                             "--dtype", dtype, "--max-loaded-adapters", "2", "--max-model-len", "128",
                             "--allow-runtime-loading", "--adapter-root", os.path.join(folder, "http")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = None
        while url is None:
            select.select([proc.stdout], [], [], 120)
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("lorakit serve exited before it was ready")
            if "http://" in line:
                url = line.split(" at ")[1].strip()
        times = []
        with httpx.Client(base_url=url, timeout=60) as client:
            body = {"prompt": "To be, or not to be", "max_tokens": 1, "stream": True, "temperature": 0}
            with client.stream("POST", "/completions", json={"model": "model", **body}) as response:
                for _ in response.iter_lines():  # warm the server up
                    pass
            for i, path in enumerate(paths):
                start = time.perf_counter()
                client.post("/load_lora_adapter", json={"lora_name": f"cold{i}", "lora_path": path}).raise_for_status()
                with client.stream("POST", "/completions", json={"model": f"cold{i}", **body}) as response:
                    next(line for line in response.iter_lines() if line.startswith("data: {"))
                    times.append((time.perf_counter() - start) * 1e3)
        return times
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable] + sys.argv) if argv is None else shlex.join(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    if args.quick:
        args.rounds, args.new_tokens = 2, 16
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    config = model_config(args.quick, args.hidden, args.layers)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    base = LlamaForCausalLM(config).to(args.device).eval()
    tokenizer = load_tokenizer(None)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"model: LlamaForCausalLM {n_params / 1e6:.1f}M params (hidden {config.hidden_size}, "
          f"{config.num_hidden_layers} layers), batch {args.batch} x ({args.prompt_len} prompt + {args.new_tokens} "
          f"new) tokens, {args.dtype}, {threads} threads, {args.device}")
    workdir = tempfile.mkdtemp(prefix="serve-bench-")
    file_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.adapter_dtype]
    paths = make_adapters(base, args.batch, 8, workdir, file_dtype)
    names = [f"a{i}" for i in range(args.batch)]

    base = base.to(dtype)  # adapters were made in fp32; each contender casts them as it does for users
    engine = Engine(EngineConfig(max_running=args.batch, max_loaded_adapters=args.batch, max_model_len=256,
                                 adapter_dtype=args.engine_adapter_dtype, switching="off"),
                    model=copy.deepcopy(base), tokenizer=tokenizer)
    merged_engine = Engine(EngineConfig(max_running=args.batch, max_loaded_adapters=2, max_model_len=256,
                                        switching="merged"), model=copy.deepcopy(base), tokenizer=tokenizer)
    for name, path in zip(names, paths):
        engine.add_adapter(name, path)
    merged_engine.add_adapter(names[0], paths[0])
    # The same adapters saved in bf16 (each factor rounded once), which the engine holds in bf16 exactly:
    # what a mixed batch costs when the adapters are 16-bit files, measured in the same run.
    engine16 = None
    if file_dtype == torch.float32:
        paths16 = make_adapters(base, args.batch, 8, os.path.join(workdir, "bf16"), torch.bfloat16)
        engine16 = Engine(EngineConfig(max_running=args.batch, max_loaded_adapters=args.batch, max_model_len=256,
                                       switching="off"),
                          model=copy.deepcopy(base), tokenizer=tokenizer)
        for name, path in zip(names, paths16):
            engine16.add_adapter(name, path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name=names[0])
    for name, path in zip(names[1:], paths[1:]):
        peft_model.load_adapter(path, adapter_name=name)
    peft_model.eval()
    hf_model = copy.deepcopy(base)

    torch.manual_seed(1)
    prompts = torch.randint(3, config.vocab_size, (args.batch, args.prompt_len), device=args.device)
    prompt_lists = prompts.tolist()
    fns = {
        "lorakit base": engine_runner(engine, prompt_lists, [None] * args.batch, args.new_tokens),
        "lorakit mixed": engine_runner(engine, prompt_lists, names, args.new_tokens),
        "lorakit single": engine_runner(engine, prompt_lists, [names[0]] * args.batch, args.new_tokens),
        "lorakit single merged": engine_runner(merged_engine, prompt_lists, [names[0]] * args.batch, args.new_tokens),
        **({"lorakit mixed bf16 files": engine_runner(engine16, prompt_lists, names, args.new_tokens)}
           if engine16 is not None else {}),
        "hf base": generate_runner(hf_model, prompts, args.new_tokens),
        "peft mixed": generate_runner(peft_model, prompts, args.new_tokens, adapter_names=names),
    }

    with torch.inference_mode():
        mixed = fns["lorakit mixed"]()
        peft_mixed = fns["peft mixed"]()
        alone = [engine_runner(engine, [ids], [name], args.new_tokens)()[0] for ids, name in zip(prompt_lists, names)]
    print(f"engine: LoRA on the {engine.slots.path} path, adapters held in {str(engine.slots.dtype)[6:]} "
          f"(saved in {args.adapter_dtype}; adapter_dtype={args.engine_adapter_dtype})")
    agree_peft = sum(a == b for a, b in zip(mixed, peft_mixed))
    agree_alone = sum(a == b for a, b in zip(mixed, alone))
    print(f"check: engine mixed batch == PEFT mixed batch on {agree_peft}/{args.batch} rows; "
          f"== each request alone on {agree_alone}/{args.batch} rows (greedy, {args.new_tokens} tokens, {args.dtype})")

    timing = time_pair(fns, rounds=args.rounds, warmup=1, device=args.device, autocast=nullcontext)
    tokens = args.batch * args.new_tokens
    median = {name: statistics.median(t) for name, t in timing["times"].items()}
    rate = {name: tokens / t for name, t in median.items()}
    ratios = {
        "mixed_vs_base": rate["lorakit mixed"] / rate["lorakit base"],
        "mixed_vs_peft": rate["lorakit mixed"] / rate["peft mixed"],
        "base_vs_transformers": rate["lorakit base"] / rate["hf base"],
        "single_vs_base": rate["lorakit single"] / rate["lorakit base"],
        "single_merged_vs_base": rate["lorakit single merged"] / rate["lorakit base"],
        **({"mixed_bf16_files_vs_base": rate["lorakit mixed bf16 files"] / rate["lorakit base"]}
           if engine16 is not None else {}),
        "peft_mixed_vs_hf_base": rate["peft mixed"] / rate["hf base"],
    }
    cold = cold_start_ms(base, tokenizer, workdir, args.device)
    cold_http = http_cold_start_ms(base, tokenizer, workdir, args.dtype) if args.device == "cpu" else []
    print(f"\n{'contender':<24}{'tokens/s':>10}{'median s':>10}")
    for name in fns:
        print(f"{name:<24}{rate[name]:>10.0f}{median[name]:>10.3f}")
    print(f"\nrounds kept {len(timing['times']['lorakit base'])}, redone for contention "
          f"{timing['rounds_redone_for_contention']}")
    verdict = lambda ok: "ok" if ok else "MISSED"  # noqa: E731
    print(f"lorakit mixed / lorakit base : {ratios['mixed_vs_base']:.2f}  (target >= 0.9) "
          f"{verdict(ratios['mixed_vs_base'] >= TARGETS['mixed_vs_base'])}")
    if engine16 is not None:
        print(f"  the same adapters saved in bf16 (held in bf16, half the bytes): "
              f"{ratios['mixed_bf16_files_vs_base']:.2f} {verdict(ratios['mixed_bf16_files_vs_base'] >= 0.9)}")
    print(f"lorakit mixed / PEFT mixed   : {ratios['mixed_vs_peft']:.2f}  (target >= 4) "
          f"{verdict(ratios['mixed_vs_peft'] >= TARGETS['mixed_vs_peft'])}")
    print(f"lorakit base / transformers  : {ratios['base_vs_transformers']:.2f}  (target >= 2) "
          f"{verdict(ratios['base_vs_transformers'] >= TARGETS['base_vs_transformers'])}")
    print(f"lorakit single / base        : {ratios['single_vs_base']:.2f} unmerged, "
          f"{ratios['single_merged_vs_base']:.2f} merged")
    print(f"cold adapter load -> first token, r=16 all-linear: median {statistics.median(cold):.1f} ms "
          f"(max {max(cold):.1f}; target <= 100) {verdict(statistics.median(cold) <= TARGETS['cold_start_ms'])}")
    if cold_http:
        print(f"the same through lorakit serve (POST load_lora_adapter -> first streamed chunk): median "
              f"{statistics.median(cold_http):.1f} ms (max {max(cold_http):.1f}) "
              f"{verdict(statistics.median(cold_http) <= TARGETS['cold_start_ms'])}")
    print(f"command: {command}")
    if args.json:
        figures = {"command": command, "date": datetime.date.today().isoformat(),
                   "machine": machine_info(args.device, threads),
                   "setup": {"params": n_params, "dtype": args.dtype, "adapter_file_dtype": args.adapter_dtype,
                             "engine_adapter_dtype": args.engine_adapter_dtype, "lora_path": engine.slots.path,
                             "batch": args.batch, "prompt_len": args.prompt_len,
                             "new_tokens": args.new_tokens, "rank": 8, "targets": "all-linear"},
                   "check": {"rows_equal_peft": agree_peft, "rows_equal_alone": agree_alone},
                   "tokens_per_second": rate, "ratios": ratios, "targets": TARGETS,
                   "cold_start_ms": cold, "cold_start_http_ms": cold_http,
                   "timing": {k: v for k, v in timing.items() if k != "times"},
                   "round_seconds": timing["times"]}
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
