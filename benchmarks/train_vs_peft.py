#!/usr/bin/env python
"""Training speed and memory of `lorakit train`'s step against PEFT with a plain PyTorch loop, in one run.

Both sides train the same model (a LlamaForCausalLM built in-process and saved to a temporary folder,
loaded by each side from there), with the same adapter (r=8, alpha=16, every linear layer), the same
initial adapter weights (lorakit's fresh adapter, written with lorakit.save_adapter and loaded with
PeftModel.from_pretrained(..., is_trainable=True)), the same seeded random token batches, the same AdamW,
learning-rate schedule and gradient clipping, and the same compute precision.

  lorakit  build_model / build_optimizer / train_step from lorakit.train: what `lorakit train` runs.
  PEFT     fp32 model + PeftModel; `model(input_ids=..., labels=...).loss` under torch.autocast for bf16,
           backward, clip_grad_norm_, optimizer.step, scheduler.step, zero_grad.

Figures:
  1. fp32 agreement: both sides train the first --check-steps steps in fp32; their losses must agree
     within 1e-4 (max |diff| reported).
  2. throughput at --precision (default bf16): one optimizer step per contender per round, interleaved
     round-robin with forward_vs_peft.py's timer (order alternating, rounds during which other processes
     used the CPU redone); tokens/s of each from the median step time, and the median and IQR of the
     per-round speed-up (PEFT step time / lorakit step time).
  3. peak memory: each contender trains a few steps in a fresh subprocess. On the CPU: resident memory,
     growth = peak during training (VmHWM, reset once the model and optimizer are built) minus the
     resident memory at that point, and the process's total peak (VmHWM, loading included; not ru_maxrss,
     which a child process inherits from its parent across exec). On CUDA:
     torch.cuda peak allocated during training minus allocated before, and the total peak allocated.

    python benchmarks/train_vs_peft.py                   # full run (~33M-parameter Llama, 8 x 128 tokens, bf16)
    python benchmarks/train_vs_peft.py --quick           # smoke run: tiny model, 3 rounds
    python benchmarks/train_vs_peft.py --json benchmarks/latest_train_vs_peft.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward_vs_peft import machine_info, model_config, summarise, time_pair  # noqa: E402

import lorakit  # noqa: E402
from lorakit.data import Batch  # noqa: E402
from lorakit.train.config import TrainConfig  # noqa: E402
from lorakit.train.loop import train_step  # noqa: E402
from lorakit.train.setup import Runtime, build_model, build_optimizer  # noqa: E402

SPEEDUP_TARGET = 1.5      # lorakit tokens/s >= 1.5x PEFT's
MEMORY_TARGET = 1.0       # lorakit peak memory <= PEFT's
LOSS_TOLERANCE = 1e-4     # fp32 losses of the first steps


# --- setup -----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small model, small batch, few rounds")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="precision of the timed steps")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds, one step each (default 20, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per contender (default 2, quick 1)")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (default 8, quick 2)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128, quick 32)")
    p.add_argument("--check-steps", type=int, default=5, help="fp32 steps whose losses are compared (default 5)")
    p.add_argument("--memory-steps", type=int, default=3, help="steps per memory subprocess (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPU cores)")
    p.add_argument("--contention-threshold", type=float, default=0.05,
                   help="redo a round if other processes used more than this fraction of one core during it "
                        "(default 0.05); a negative value never redoes")
    p.add_argument("--max-redo", type=int, default=1,
                   help="at most this many times --rounds extra rounds are spent on redoing (default 1)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if a target is missed")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="lorakit with --compile (torch.compile'd decoder layers)")
    p.add_argument("--hidden", type=int, default=0, help="a larger Llama: hidden size (e.g. 1024 with --layers 24: "
                                                         "~0.5B parameters, for a GPU)")
    p.add_argument("--layers", type=int, default=0, help="with --hidden: number of layers (default 8)")
    p.add_argument("--memory-worker", choices=["lorakit", "PEFT"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available in this torch build / on this machine")
    defaults = dict(rounds=(3, 20), warmup=(1, 2), batch=(2, 8), seq_len=(32, 128))
    for key, (quick, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


def make_batches(count: int, batch: int, seq_len: int, vocab: int, seed: int, device: str) -> list:
    """`count` batches of random tokens without padding, every position labelled (the labels are the inputs)."""
    generator = torch.Generator().manual_seed(seed + 100)
    positions = torch.arange(seq_len, device=device).expand(batch, -1).contiguous()
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=generator).to(device)
        out.append(Batch(input_ids=ids, labels=ids.clone(), position_ids=positions, attention_mask=None,
                         label_tokens=batch * (seq_len - 1), tokens=batch * seq_len))
    return out


COMPILE = {"layers": False}   # set from --compile: lorakit's `lorakit train --compile` path


def train_config(model_dir: str, precision: str, max_steps: int, seed: int) -> TrainConfig:
    return TrainConfig(model=model_dir, r=8, lora_alpha=16, target_modules="all-linear", precision=precision,
                       max_steps=max_steps, seed=seed, progress=False, compile=COMPILE["layers"])


class LorakitTrainer:
    """lorakit's side: build_model, build_optimizer and one train_step per call."""

    def __init__(self, config: TrainConfig, device: str) -> None:
        self.device, self.precision = torch.device(device), config.precision
        self.model = build_model(config, Runtime(device=self.device), config.precision)
        self.optimizer, self.scheduler = build_optimizer(config, self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.max_grad_norm = config.max_grad_norm

    def step(self, batch) -> float:
        return train_step(self.model, self.optimizer, self.scheduler, [batch], precision=self.precision,
                          device=self.device, max_grad_norm=self.max_grad_norm, parameters=self.trainable)["loss"]


class PeftTrainer:
    """The peer: the plain loop a PEFT user writes, with the same optimizer and schedule as lorakit's."""

    def __init__(self, config: TrainConfig, adapter_dir: str, device: str) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32).to(device)
        self.model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True).train()
        self.optimizer, self.scheduler = build_optimizer(config, self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.max_grad_norm = config.max_grad_norm
        self.autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if config.precision == "bf16" \
            else nullcontext

    def step(self, batch) -> float:
        with self.autocast():
            loss = self.model(input_ids=batch.input_ids, labels=batch.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def make_trainers(workdir: str, precision: str, max_steps: int, seed: int, device: str):
    """(lorakit, PEFT) trainers starting from the same weights; the adapter goes through save_adapter."""
    config = train_config(os.path.join(workdir, "model"), precision, max_steps, seed)
    ours = LorakitTrainer(config, device)
    adapter_dir = os.path.join(workdir, f"adapter-{precision}")
    lorakit.save_adapter(ours.model, adapter_dir)
    return ours, PeftTrainer(config, adapter_dir, device)


def stepper(trainer, batches: list) -> Callable[[], float]:
    """One optimizer step per call on the next batch, with autograd on (the timer runs in inference mode)."""
    position = iter(range(10**9))

    def run() -> float:
        with torch.inference_mode(False):
            return trainer.step(batches[next(position) % len(batches)])
    return run


# --- memory (run in a fresh subprocess per contender) ----------------------------------------------------
def memory_worker(args) -> dict:
    """Train --memory-steps steps of one contender; report its memory as described in the module doc."""
    device = args.device
    config = train_config(os.path.join(args.workdir, "model"), args.precision, args.memory_steps, args.seed)
    if args.memory_worker == "lorakit":
        trainer = LorakitTrainer(config, device)
    else:
        trainer = PeftTrainer(config, os.path.join(args.workdir, f"adapter-{args.precision}"), device)
    vocab = trainer.model.config.vocab_size
    batches = make_batches(args.memory_steps, args.batch, args.seq_len, vocab, args.seed, device)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        loading_peak, before = resident_bytes()["VmHWM"], resident_bytes()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")        # reset the resident high-water mark (VmHWM) to the current RSS
    for batch in batches:
        trainer.step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"kind": "torch.cuda allocated", "before_training_mb": before / 2**20,
                "training_growth_mb": (peak - before) / 2**20, "total_peak_mb": peak / 2**20}
    training_peak = resident_bytes()["VmHWM"]
    return {"kind": "resident set (RSS)", "before_training_mb": before / 2**20,
            "training_growth_mb": (training_peak - before) / 2**20,
            "total_peak_mb": max(loading_peak, training_peak) / 2**20}


def resident_bytes() -> dict:
    with open("/proc/self/status") as f:
        rows = [line.split() for line in f if line.startswith(("VmRSS", "VmHWM"))]
    return {row[0].rstrip(":"): int(row[1]) * 1024 for row in rows}


def measure_memory(args, name: str, workdir: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--memory-worker", name, "--workdir", workdir,
               "--device", args.device, "--precision", args.precision, "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--memory-steps", str(args.memory_steps), "--seed", str(args.seed),
               "--threads", str(torch.get_num_threads())] + (["--compile"] if args.compile else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory subprocess for {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- main ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    COMPILE["layers"] = args.compile
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()
    if args.memory_worker:
        print(json.dumps(memory_worker(args)))
        return 0
    command = shlex.join([sys.executable] + sys.argv) if argv is None else shlex.join(argv)
    threads, device = torch.get_num_threads(), args.device
    config = model_config(args.quick, args.hidden, args.layers)
    tokens_per_step = args.batch * args.seq_len
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lorakit-train-bench-") as workdir:
        from transformers import LlamaForCausalLM
        torch.manual_seed(args.seed)
        base = LlamaForCausalLM(config)
        n_params = sum(p.numel() for p in base.parameters())
        base.save_pretrained(os.path.join(workdir, "model"))
        del base
        print(f"model: LlamaForCausalLM {n_params / 1e6:.1f}M params (hidden {config.hidden_size}, "
              f"{config.num_hidden_layers} layers, vocab {config.vocab_size}), batch {args.batch} x "
              f"{args.seq_len} tokens, r=8 all-linear, device {device}, {threads} threads", flush=True)

        # 1. fp32: the same computation, so the same losses.
        batches = make_batches(args.check_steps, args.batch, args.seq_len, config.vocab_size, args.seed, device)
        ours, peer = make_trainers(workdir, "fp32", args.check_steps, args.seed, device)
        losses = {"lorakit": [ours.step(b) for b in batches], "PEFT": [peer.step(b) for b in batches]}
        loss_diff = max(abs(a - b) for a, b in zip(losses["lorakit"], losses["PEFT"]))
        print(f"[fp32] losses over {args.check_steps} steps: max |lorakit - PEFT| = {loss_diff:.2e} "
              f"(<= {LOSS_TOLERANCE:g}: {'ok' if loss_diff <= LOSS_TOLERANCE else 'FAIL'})", flush=True)
        del ours, peer
        gc.collect()

        # 2. throughput, interleaved.
        steps = args.warmup + (1 + max(args.max_redo, 0)) * args.rounds
        batches = make_batches(steps, args.batch, args.seq_len, config.vocab_size, args.seed, device)
        ours, peer = make_trainers(workdir, args.precision, steps, args.seed, device)
        attention = {name: t.model.config._attn_implementation for name, t in (("lorakit", ours), ("PEFT", peer))}
        print(f"[{args.precision}] timing {args.rounds} rounds (+{args.warmup} warm-up steps each); attention: "
              f"lorakit {attention['lorakit']}, PEFT {attention['PEFT']}...", flush=True)
        timing = time_pair({"PEFT": stepper(peer, batches), "lorakit": stepper(ours, batches)}, args.rounds,
                           args.warmup, device, nullcontext, contention_threshold=args.contention_threshold,
                           max_redo_factor=args.max_redo)
        speed = summarise(timing, "PEFT", "lorakit")    # ratios are PEFT time / lorakit time: the speed-up
        del ours, peer, batches
        gc.collect()

        # 3. memory, each contender in a fresh process.
        print("[memory] one fresh subprocess per contender...", flush=True)
        memory = {name: measure_memory(args, name, workdir) for name in ("lorakit", "PEFT")}
    elapsed = time.perf_counter() - t0

    tokens_s = {name: tokens_per_step / (ms / 1e3) for name, ms in speed["median_ms"].items()}
    growth_ratio = memory["lorakit"]["training_growth_mb"] / memory["PEFT"]["training_growth_mb"]
    total_ratio = memory["lorakit"]["total_peak_mb"] / memory["PEFT"]["total_peak_mb"]
    verdicts = {"fp32 losses agree": loss_diff <= LOSS_TOLERANCE,
                f"speed-up >= {SPEEDUP_TARGET}": speed["median_per_round_ratio"] >= SPEEDUP_TARGET,
                "peak memory <= PEFT's": max(growth_ratio, total_ratio) <= MEMORY_TARGET}

    # --- report ------------------------------------------------------------------------------------------
    info = machine_info(device, threads)
    iqr = speed["per_round_ratio_iqr"]
    print()
    print("| contender | median step ms | tokens/s | training memory growth MB | total peak MB |")
    print("|-----------|----------------|----------|---------------------------|---------------|")
    for name in ("lorakit", "PEFT"):
        m = memory[name]
        print(f"| {name} | {speed['median_ms'][name]:.0f} | {tokens_s[name]:.0f} | "
              f"{m['training_growth_mb']:.0f} | {m['total_peak_mb']:.0f} |")
    print()
    print(f"speed-up (PEFT step time / lorakit step time): per-round median {speed['median_per_round_ratio']:.2f} "
          f"(IQR {iqr[0]:.2f}-{iqr[1]:.2f}), ratio of medians {speed['ratio_of_medians']:.2f}; "
          f"{speed['rounds']} rounds, {speed['rounds_redone_for_contention']} redone for contention"
          + (f", {speed['contended_rounds_kept']} contended kept" if speed["contended_rounds_kept"] else ""))
    print(f"memory lorakit / PEFT ({memory['lorakit']['kind']}): training growth {growth_ratio:.2f}, "
          f"total peak {total_ratio:.2f}")
    print(f"fp32 loss agreement over {args.check_steps} steps: max |diff| = {loss_diff:.2e}")
    print(f"command: {command}")
    print(f"machine: {info['cpu']}, nproc {info['nproc']}, torch {info['torch']} ({threads} threads), "
          f"transformers {info.get('transformers')}, peft {info.get('peft')}, device {device}"
          + (f" ({info['gpu']})" if "gpu" in info else "") + f"; benchmark time {elapsed:.0f} s")
    for name, ok in verdicts.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    if args.quick:
        print("quick run: a smoke test; its tiny model measures per-call overhead, so its ratios mean little")

    if args.json:
        out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": command, "machine": info,
               "settings": {"quick": args.quick, "precision": args.precision, "rounds": args.rounds,
                            "warmup": args.warmup, "batch": args.batch, "seq_len": args.seq_len,
                            "tokens_per_step": tokens_per_step, "params": n_params, "r": 8, "lora_alpha": 16,
                            "target_modules": "all-linear", "check_steps": args.check_steps, "attention": attention,
                            "memory_steps": args.memory_steps,
                            "model_config": {k: getattr(config, k) for k in (
                                "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "vocab_size")}},
               "elapsed_s": elapsed, "tokens_per_second": tokens_s, "speed": speed,
               "memory": memory, "memory_ratio": {"training_growth": growth_ratio, "total_peak": total_ratio},
               "fp32_losses": losses, "fp32_max_abs_loss_diff": loss_diff,
               "verdicts": {k: "PASS" if v else "FAIL" for k, v in verdicts.items()}}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"figures written to {args.json}")
    if args.strict and not all(verdicts.values()):
        return 1
    return 0 if verdicts["fp32 losses agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
