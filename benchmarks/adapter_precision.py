#!/usr/bin/env python
"""What `--adapter-dtype bf16` costs fp32 adapters: the shipped example adapters served with their factors
held in fp32 (exact) and rounded to bf16, on the same held-out prompts.

For each adapter in examples/adapters (reverse_words and count_words as plain prompts, to_json as chat),
the skill's 200 held-out rows (`write_skill`'s split, seed 0) are decoded greedily by the engine twice,
with adapter_dtype "fp32" and "bf16". Reported: held-out exact match of each, how many of the 200 outputs
are identical, and the largest difference of the first-token logits.

    python benchmarks/adapter_precision.py [--rows 200] [--json benchmarks/latest_adapter_precision.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward_vs_peft import machine_info  # noqa: E402

from lorakit.data.skills import chat_rows, heldout_rows, skill_rows  # noqa: E402
from lorakit.engine import Engine, EngineConfig, SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = {"reverse": ("reverse_words", False), "json": ("to_json", True), "count": ("count_words", False)}


def prompts_and_answers(tokenizer, skill: str, chat: bool, rows: int) -> tuple[list[list[int]], list[str]]:
    held = heldout_rows(skill, rows, 0, skill_rows(skill, 2000, 0))
    if not chat:
        return [tokenizer(r["prompt"])["input_ids"] for r in held], [r["completion"].strip() for r in held]
    ids = []
    for row in chat_rows(held):
        text = tokenizer.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids, [r["completion"].strip() for r in held]


def decode(adapter_dtype: str, name: str, prompts: list[list[int]]) -> tuple[list[str], torch.Tensor]:
    engine = Engine(EngineConfig(dtype="fp32", max_running=16, max_queue=len(prompts), max_loaded_adapters=1,
                                 adapter_dtype=adapter_dtype, switching="off"))  # the factors as the LoRA path reads them
    engine.add_adapter(name, str(ROOT / "examples" / "adapters" / name))
    params = SamplingParams(max_tokens=48, temperature=0)
    handles = [engine.submit(ids, params, name) for ids in prompts]
    engine.run_until_idle()
    texts = [h.result().text.strip() for h in handles]
    slot = engine.adapter_cache.acquire(engine.adapter_cache.lookup(name))
    first = [torch.tensor([ids]) for ids in prompts[:16]]
    lora = engine.slots.batch([slot])
    logits = torch.stack([engine.runner.forward_prompts(ids, torch.arange(ids.shape[1])[None],
                                                        torch.tensor([ids.shape[1] - 1]), lora)[0] for ids in first])
    return texts, logits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--json")
    args = p.parse_args(argv)
    command = shlex.join([sys.executable] + (sys.argv if argv is None else ["benchmarks/adapter_precision.py"] + argv))
    results = {}
    for name, (skill, chat) in ADAPTERS.items():
        tokenizer = Engine(EngineConfig(max_running=1, max_model_len=64)).tokenizer
        prompts, answers = prompts_and_answers(tokenizer, skill, chat, args.rows)
        fp32_texts, fp32_logits = decode("fp32", name, prompts)
        bf16_texts, bf16_logits = decode("bf16", name, prompts)
        results[name] = {
            "skill": skill, "rows": len(prompts),
            "exact_match_fp32": sum(t == a for t, a in zip(fp32_texts, answers)) / len(answers),
            "exact_match_bf16": sum(t == a for t, a in zip(bf16_texts, answers)) / len(answers),
            "identical_outputs": sum(a == b for a, b in zip(fp32_texts, bf16_texts)),
            "max_first_logit_diff": float((fp32_logits - bf16_logits).abs().max()),
            "first_logit_scale": float(fp32_logits.abs().max()),
        }
        r = results[name]
        print(f"{name:8s} ({skill}): exact match fp32 {r['exact_match_fp32']:.1%}, bf16 {r['exact_match_bf16']:.1%}; "
              f"identical outputs {r['identical_outputs']}/{r['rows']}; first-token logits differ by at most "
              f"{r['max_first_logit_diff']:.2e} (largest logit {r['first_logit_scale']:.1f})")
    print(f"command: {command}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": command, "date": datetime.date.today().isoformat(),
                       "machine": machine_info("cpu", torch.get_num_threads()), "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
