"""Train every example skill with `lorakit train`'s defaults and score the adapters with PEFT alone.

    python benchmarks/skills_quality.py [--skills reverse_words key_lookup ...] [--json PATH] [-- EXTRA FLAGS]

For each skill: the wall-clock time of the whole `lorakit train --skill S` command (a fresh process:
loading, data, evaluation before and after, saving), then held-out exact match of the bare embedded base
model and of base + adapter, both computed here with transformers + PEFT (`PeftModel.from_pretrained`),
not with lorakit, by greedy decoding with HF `generate`. The bars: base <= 10%, adapter >= 90%, and the
run under 5 minutes on 2 CPU cores.
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


def exact_match_with_peft(base_folder: Path, adapter: Path | None, heldout: Path, limit: int) -> float:
    """Greedy exact match on the held-out prompt/completion rows, with transformers (+ PEFT) only."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(base_folder)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    model.eval()
    rows = [json.loads(line) for line in heldout.read_text().splitlines()][:limit]
    hits = 0
    for start in range(0, len(rows), 50):
        chunk = rows[start:start + 50]
        inputs = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += sum(t.strip() == r["completion"].strip() for t, r in zip(texts, chunk))
    return hits / len(rows)


def main() -> None:
    from lorakit.data.skills import SKILLS
    from lorakit.models import EMBEDDED_MODEL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skills", nargs="+", default=[n for n, s in SKILLS.items() if not s.stretch],
                        help="default: every skill but the stretch ones (--skills sort_numbers key_lookup ...)")
    parser.add_argument("--heldout-rows", type=int, default=200)
    parser.add_argument("--json", type=Path)
    parser.add_argument("extra", nargs="*", help="extra `lorakit train` flags, after --")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for skill in args.skills:
            output = Path(tmp) / skill
            command = [sys.executable, "-m", "lorakit.cli", "train", "--skill", skill, "--output", str(output),
                       "--no-progress", *args.extra]
            began = time.perf_counter()
            run = subprocess.run(command, capture_output=True, text=True)
            seconds = time.perf_counter() - began
            if run.returncode != 0:
                print(f"{skill}: lorakit train failed:\n{run.stderr}", file=sys.stderr)
                sys.exit(1)
            report = json.loads((output / "train_report.json").read_text())
            heldout = output / "data" / skill / "heldout.jsonl"
            base = exact_match_with_peft(EMBEDDED_MODEL, None, heldout, args.heldout_rows)
            adapted = exact_match_with_peft(EMBEDDED_MODEL, output, heldout, args.heldout_rows)
            results.append({"skill": skill, "wall_seconds": round(seconds, 1), "steps": report["steps"],
                            "tokens_per_second": report["tokens_per_second"], "precision": report["precision"],
                            "base_exact_match": base, "adapter_exact_match_peft": adapted,
                            "lorakit_exact_match": report["eval_after"].get("exact_match")})
            r = results[-1]
            print(f"{skill:14s} {seconds:6.1f}s  {r['tokens_per_second']:8.0f} tok/s  base {100 * base:5.1f}%  "
                  f"adapter (PEFT) {100 * adapted:5.1f}%  (lorakit's own eval {100 * (r['lorakit_exact_match'] or 0):.1f}%)",
                  flush=True)
    ok = all(r["base_exact_match"] <= 0.10 and r["adapter_exact_match_peft"] >= 0.90 and r["wall_seconds"] < 300
             for r in results)
    print("verdict:", "PASS" if ok else "FAIL", "(base <= 10%, adapter >= 90%, each run < 5 min)")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
                                         "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                                                    f"torch {torch.__version__}", "results": results}, indent=2))


if __name__ == "__main__":
    main()
