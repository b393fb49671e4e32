#!/usr/bin/env python
"""QLoRA against a 16-bit base, in one run: base weight bytes, and adapter quality on every example skill.

1. Weight bytes. The embedded model and a larger random Llama (hidden 2048, 16 layers, vocab 32000:
   ~0.9B parameters, built on the meta device and quantized weight by weight, so no 0.9B model is ever
   held) are quantized to NF4 and int8, as QLoRA does (linear layers only; embeddings, norms and head stay
   16-bit) and with `--quantize-embeddings` (the embedding table and head too); reported: the quantized
   weights' bytes ÷ the same weights at bf16, and the whole model's bytes ÷ bf16.
   Targets: NF4 <= 0.30, int8 <= 0.55.
2. Quality. For each skill, `lorakit train --skill S` with its defaults on the bf16 base and again with
   `--quantize nf4` (same seed, same data); held-out exact match is lorakit's own evaluation at the end
   of each run (the NF4 adapter is evaluated on the NF4 base it was trained on), plus peak memory and
   tokens/s from train_report.json. Target: NF4 within 5 points of bf16 on every skill.
3. Training memory (--memory-only): peak memory of 3 `lorakit train` steps on a random ~0.3B Llama saved
   to a temporary folder, with a bf16, an NF4 and an int8 base.

    python benchmarks/qlora_vs_bf16.py [--skills reverse_words ...] [--json benchmarks/latest_qlora_vs_bf16.json]
    python benchmarks/qlora_vs_bf16.py --bytes-only
    python benchmarks/qlora_vs_bf16.py --memory-only --json benchmarks/latest_qlora_training_memory.json
    python benchmarks/qlora_vs_bf16.py --embeddings --reuse-bf16 benchmarks/latest_qlora_vs_bf16.json \
        --json benchmarks/latest_qlora_embeddings_vs_bf16.json     # NF4 embeddings and head too
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGETS = {"nf4": 0.30, "int8": 0.55, "exact_match_points": 5.0}


def quantized_bytes(config, method: str, embeddings: bool) -> dict:
    """Quantize a model weight by weight from random values of `config`'s shapes (as `quantize_model` would:
    the linear layers, and with `embeddings` the embedding table and head); bytes before and after."""
    from transformers import AutoModelForCausalLM

    from lorakit.quant.linear import quantize
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    quantized_modules = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    if embeddings:
        quantized_modules += [model.get_input_embeddings(), model.get_output_embeddings()]
    targets = {id(m.weight): m.weight for m in quantized_modules}  # a tied head shares the table's weight
    before = after = 0
    for weight in targets.values():
        values = torch.randn(weight.shape, dtype=torch.bfloat16) * 0.02
        before += 2 * values.numel()
        after += quantize(values, method, "torch").num_bytes
    rest = 2 * sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in targets)
    return {"method": method, "embeddings": embeddings, "quantized_bf16_bytes": before, "quantized_bytes": after,
            "layer_ratio": after / before, "model_bf16_bytes": before + rest, "model_bytes": after + rest,
            "model_ratio": (after + rest) / (before + rest)}


def weight_bytes_table() -> list[dict]:
    from transformers import AutoConfig, LlamaConfig

    from lorakit.models import EMBEDDED_MODEL
    models = {"embedded (5.7M)": AutoConfig.from_pretrained(EMBEDDED_MODEL),
              "random Llama (0.9B)": LlamaConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
                                                 num_attention_heads=16, num_key_value_heads=16, vocab_size=32000)}
    rows = []
    for label, config in models.items():
        for embeddings in (False, True):
            for method in ("nf4", "int8"):
                row = {"model": label, **quantized_bytes(config, method, embeddings)}
                rows.append(row)
                what = "+ embeddings" if embeddings else "linear only "
                print(f"{label:22s} {method:5s} {what}  quantized {row['quantized_bf16_bytes'] / 2**20:8.1f} MiB -> "
                      f"{row['quantized_bytes'] / 2**20:7.1f} MiB ({row['layer_ratio']:.3f}x)   whole model "
                      f"{row['model_ratio']:.3f}x   (target <= {TARGETS[method]})", flush=True)
    return rows


def training_memory(steps: int = 3) -> list[dict]:
    """Peak memory of short `lorakit train` runs on a random ~0.3B Llama, bf16 base against NF4 and int8."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.models import load_tokenizer
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=1536, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=12,
                             num_key_value_heads=12, vocab_size=4096, max_position_embeddings=512)
        LlamaForCausalLM(config).save_pretrained(folder)
        load_tokenizer(None).save_pretrained(folder)
        for label, flags in (("bf16", []), ("nf4", ["--quantize", "nf4"]), ("int8", ["--quantize", "int8"])):
            output = Path(tmp) / label
            command = [sys.executable, "-m", "lorakit.cli", "train", "--model", str(folder), "--output", str(output),
                       "--max-steps", str(steps), "--batch-size", "2", "--max-length", "128", "--eval-samples", "0",
                       "--save-steps", str(steps), "--precision", "bf16", "--no-progress", *flags]
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"{' '.join(command)} failed:\n{run.stderr}")
            report = json.loads((output / "train_report.json").read_text())
            rows.append({"base": label, "peak_memory_mb": report["peak_memory_mb"],
                         "training_peak_memory_mb": report.get("training_peak_memory_mb"),
                         "params": report["total_params"], "quantization": report.get("quantization")})
            print(f"random Llama (0.3B) {label:5s} base: peak memory {report['peak_memory_mb']:7.0f} MB with loading, "
                  f"{report.get('training_peak_memory_mb') or 0:7.0f} MB while training (3 steps of 2 x 128 tokens, "
                  f"r=8 all-linear)", flush=True)
    return rows


def train(skill: str, output: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "lorakit.cli", "train", "--skill", skill, "--output", str(output), "--no-progress",
               *extra]
    began = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{run.stderr}")
    report = json.loads((output / "train_report.json").read_text())
    return {"wall_seconds": round(time.perf_counter() - began, 1), "exact_match": report["eval_after"]["exact_match"],
            "peak_memory_mb": report["peak_memory_mb"], "tokens_per_second": report["tokens_per_second"],
            "quantization": report.get("quantization")}


def main() -> None:
    from lorakit.data.skills import SKILLS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skills", nargs="+", default=list(SKILLS))
    parser.add_argument("--bytes-only", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="only the peak training memory of a 0.3B model")
    parser.add_argument("--embeddings", action="store_true", help="the NF4 runs also quantize embeddings and head")
    parser.add_argument("--reuse-bf16", type=Path, help="take the bf16 runs from this earlier JSON of this script")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    figures = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d"),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
               "targets": TARGETS, "skills": []}
    if args.memory_only:
        figures["training_memory"] = training_memory()
    else:
        figures["weight_bytes"] = weight_bytes_table()
    if not (args.bytes_only or args.memory_only):
        with tempfile.TemporaryDirectory() as tmp:
            earlier = ({r["skill"]: r["bf16"] for r in json.loads(args.reuse_bf16.read_text())["skills"]}
                       if args.reuse_bf16 else {})
            nf4_flags = ["--precision", "bf16", "--quantize", "nf4"] + (["--quantize-embeddings"] if args.embeddings else [])
            figures["nf4_flags"] = nf4_flags
            for skill in args.skills:
                bf16 = earlier.get(skill) or train(skill, Path(tmp) / f"{skill}-bf16", ["--precision", "bf16"])
                nf4 = train(skill, Path(tmp) / f"{skill}-nf4", nf4_flags)
                gap = 100 * (bf16["exact_match"] - nf4["exact_match"])
                figures["skills"].append({"skill": skill, "stretch": SKILLS[skill].stretch, "bf16": bf16, "nf4": nf4,
                                          "gap_points": round(gap, 1)})
                print(f"{skill:14s} bf16 {100 * bf16['exact_match']:5.1f}% ({bf16['peak_memory_mb']:.0f} MB, "
                      f"{bf16['wall_seconds']:.0f} s)   nf4 {100 * nf4['exact_match']:5.1f}% "
                      f"({nf4['peak_memory_mb']:.0f} MB, {nf4['wall_seconds']:.0f} s)   gap {gap:+.1f} points "
                      f"{'ok' if gap <= TARGETS['exact_match_points'] else 'MISSED'}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
