#!/usr/bin/env python
"""Forward-pass speed of lorakit against PEFT and against the bare base model, in one run.

Comparisons (every pair runs on the same inputs, interleaved round-robin):

  1. lorakit, one active (unmerged) adapter   vs  PEFT holding the identical adapter
       a. r=8 on all linear layers            ("all-linear")
       b. r=8 on q_proj, v_proj only
     The lorakit adapter is created with init_lora_weights=False (B != 0), written with
     lorakit.save_adapter and loaded into PEFT with PeftModel.from_pretrained, so both hold the same
     weights; their fp32 logits must agree within 1e-4 before anything is timed.
  2. lorakit after merge_adapter (wrappers still in place)  vs  the bare base model
     lorakit after merge_and_unload (plain modules again)   vs  the bare base model
     (both checked against the unmerged model's logits first)
  0. A control ("A/A"): the base model vs an identical copy of it. Its ratio shows the noise floor of
     the machine; skip it with --no-control.

Timing: each contender is warmed up, then the contenders of a pair run alternately for N rounds (the
one that goes first alternates too, to cancel order effects); we report each contender's median time,
the ratio of the medians, and the median of the per-round ratios (robust to slow drifts of machine
speed, which hit both contenders of a round alike); verdicts use the per-round ratio. A round during
which other processes took CPU time (read from /proc/stat) is discarded and measured again.

    python benchmarks/forward_vs_peft.py                 # full run (~33M-parameter Llama, 8 x 128 tokens)
    python benchmarks/forward_vs_peft.py --quick         # smoke run: tiny model, 3 rounds
    python benchmarks/forward_vs_peft.py --dtype bf16 --json figures.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Callable

import torch

import lorakit

LORAKIT_VS_PEFT_TARGET = 1.05  # lorakit may be at most 5% slower than PEFT
MERGED_TARGET = 1.00  # a merged model should cost what the base model costs


# --- setup -----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small model, small batch, few rounds")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 runs the timed forward passes under torch.autocast (weights stay fp32)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per pair (default 15, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed passes per contender (default 2, quick 1)")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (default 8, quick 2)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128, quick 32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPU cores)")
    p.add_argument("--merged-tolerance", type=float, default=0.03,
                   help="a merged/base ratio up to 1 + this passes (timing noise; default 0.03)")
    p.add_argument("--contention-threshold", type=float, default=0.05,
                   help="redo a round if other processes used more than this fraction of one core during it "
                        "(default 0.05); a negative value never redoes")
    p.add_argument("--max-redo", type=int, default=1,
                   help="at most this many times --rounds extra rounds per pair are spent on redoing (default 1)")
    p.add_argument("--no-control", action="store_true", help="skip the A/A control (base vs a copy of itself)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any comparison misses its target")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available in this torch build / on this machine")
    defaults = dict(rounds=(3, 15), warmup=(1, 2), batch=(2, 8), seq_len=(32, 128))
    for key, (quick, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


def model_config(quick: bool, hidden: int = 0, layers: int = 0):
    """The benchmarks' Llama: tiny with `quick`, ~33.5M parameters by default, or `hidden` wide (intermediate
    2.6875x, 8 heads) with `layers` layers (e.g. hidden 1024, 24 layers: a ~0.5B model for a GPU)."""
    from transformers import LlamaConfig
    if quick:
        return LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=1000)
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=8000)
    if hidden:
        config.hidden_size, config.intermediate_size = hidden, int(hidden * 2.6875)
        config.num_hidden_layers = layers or config.num_hidden_layers
    return config


def build_base(config, device: str, seed: int) -> torch.nn.Module:
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device).eval()


def with_lorakit_adapter(base, target_modules, seed: int):
    model = copy.deepcopy(base)
    torch.manual_seed(seed + 1)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=target_modules,
                                                  init_lora_weights=False))
    return model.eval()


def peft_copy(base, lorakit_model, workdir: str, tag: str):
    """PEFT holding exactly lorakit_model's adapter: saved by lorakit, loaded by PeftModel.from_pretrained."""
    from peft import PeftModel
    folder = os.path.join(workdir, tag)
    lorakit.save_adapter(lorakit_model, folder)
    return PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()


def logits_fn(model, ids) -> Callable[[], torch.Tensor]:
    return lambda: model(input_ids=ids, use_cache=False).logits


def max_abs_diff(a: Callable, b: Callable) -> float:
    with torch.inference_mode():
        return (a().float() - b().float()).abs().max().item()


# --- timing ----------------------------------------------------------------------------------------------
class ForeignCpuMeter:
    """CPU time that other processes (and the hypervisor, as steal) used while we measured, from /proc.

    On a small shared machine another process running for part of a round slows whichever contender
    runs at that moment; such rounds are detected here and measured again. Linux only; elsewhere every
    reading is 0 (no detection). Resolution is one clock tick (usually 10 ms).
    """

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")

    def _ticks(self) -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...: everything but idle and iowait is busy.
        busy = sum(fields[:3]) + sum(fields[5:8])
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return busy, int(own[11]) + int(own[12])  # utime + stime of this process (all threads)

    def start(self):
        return self._ticks() if self.available else (0, 0)

    def foreign_seconds(self, started) -> float:
        if not self.available:
            return 0.0
        busy, own = self._ticks()
        return max(0, (busy - started[0]) - (own - started[1])) / self.hz


def time_pair(fns: dict[str, Callable], rounds: int, warmup: int, device: str, autocast,
              contention_threshold: float = 0.05, max_redo_factor: int = 1) -> dict:
    """Round-robin timing of the contenders in `fns`; seconds per kept round for each contender.

    Each round runs every contender once (the order alternates between rounds). A round during which
    other processes used more than `contention_threshold` of one core (and at least 3 ticks) is
    discarded and run again, up to `max_redo_factor * rounds` extra rounds; if that budget runs out the
    remaining rounds are kept as they are (and counted in `contended_kept`).
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    meter = ForeignCpuMeter()
    names = list(fns)
    times = {name: [] for name in names}
    redone = kept_contended = 0
    with torch.inference_mode(), autocast():
        for name in names:
            for _ in range(warmup):
                fns[name]()
        sync()
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            r = 0
            while len(times[names[0]]) < rounds:
                order = names if r % 2 == 0 else names[::-1]
                r += 1
                round_times = {}
                round_start, ticks = time.perf_counter(), meter.start()
                for name in order:
                    sync()
                    start = time.perf_counter()
                    fns[name]()
                    sync()
                    round_times[name] = time.perf_counter() - start
                wall = time.perf_counter() - round_start
                foreign = meter.foreign_seconds(ticks)
                contended = contention_threshold >= 0 and foreign > max(3.0 / meter.hz, contention_threshold * wall)
                if contended and redone < max_redo_factor * rounds:
                    redone += 1
                    continue
                kept_contended += contended
                for name in names:
                    times[name].append(round_times[name])
        finally:
            if gc_was_enabled:
                gc.enable()
    return {"times": times, "rounds_redone_for_contention": redone, "contended_rounds_kept": kept_contended,
            "contention_detection": meter.available}


def summarise(timing: dict, subject: str, peer: str) -> dict:
    times = timing["times"]
    med_s, med_p = statistics.median(times[subject]), statistics.median(times[peer])
    per_round = [s / p for s, p in zip(times[subject], times[peer])]
    q = statistics.quantiles(per_round, n=4) if len(per_round) >= 2 else [per_round[0]] * 3
    return {"median_ms": {subject: med_s * 1e3, peer: med_p * 1e3},
            "ratio_of_medians": med_s / med_p,
            "median_per_round_ratio": statistics.median(per_round),
            "per_round_ratio_iqr": [q[0], q[2]],
            "per_round_ratios": per_round,
            "rounds": len(per_round),
            "rounds_redone_for_contention": timing["rounds_redone_for_contention"],
            "contended_rounds_kept": timing["contended_rounds_kept"],
            "contention_detection": timing["contention_detection"],
            "times_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}}


# --- main ------------------------------------------------------------------------------------------------
def machine_info(device: str, threads: int) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "nproc": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "torch_threads": threads, "torch": torch.__version__, "python": platform.python_version(),
            "device": device}
    try:
        import peft
        import transformers
        info.update(peft=peft.__version__, transformers=transformers.__version__)
    except Exception:  # pragma: no cover
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable] + sys.argv) if argv is None else shlex.join(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    device = args.device
    if args.dtype == "bf16":
        autocast = lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = nullcontext

    config = model_config(args.quick)
    base = build_base(config, device, args.seed)
    n_params = sum(p.numel() for p in base.parameters())
    torch.manual_seed(args.seed + 100)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    print(f"model: LlamaForCausalLM {n_params / 1e6:.1f}M params (hidden {config.hidden_size}, "
          f"{config.num_hidden_layers} layers), input {args.batch} x {args.seq_len} tokens, {args.dtype}, "
          f"device {device}, {threads} threads, {args.rounds} rounds (+{args.warmup} warm-up)", flush=True)

    def timer(fns):
        return time_pair(fns, args.rounds, args.warmup, device, autocast,
                         contention_threshold=args.contention_threshold, max_redo_factor=args.max_redo)

    merged_target = MERGED_TARGET + args.merged_tolerance
    merged_text = f"~1.00 (<= {merged_target:.2f})"
    comparisons = []
    t0 = time.perf_counter()
    if not args.no_control:
        # 0. A/A control: two identical base models. Anything but ~1.00 here is machine noise (or memory
        #    placement), and bounds how far the other ratios can be trusted.
        twin = copy.deepcopy(base)
        print("[control] base model vs an identical copy; timing...", flush=True)
        subject, peer = "control: copy of base model", "base model (no adapter)"
        res = summarise(timer({subject: logits_fn(twin, ids), peer: logits_fn(base, ids)}), subject, peer)
        comparisons.append(dict(group="control", subject=subject, peer=peer, target=merged_target,
                                target_text=merged_text, **res))
        del twin
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as workdir:
        # 1. lorakit vs PEFT, identical adapters.
        for tag, targets in (("all-linear", "all-linear"), ("q_proj,v_proj", ["q_proj", "v_proj"])):
            lk = with_lorakit_adapter(base, targets, args.seed)
            pf = peft_copy(base, lk, workdir, tag.replace(",", "_"))
            diff = max_abs_diff(logits_fn(lk, ids), logits_fn(pf, ids))
            assert diff <= 1e-4, f"lorakit and PEFT logits differ by {diff:.3g} (> 1e-4) for r=8 {tag}"
            print(f"[{tag}] lorakit vs PEFT fp32 logits: max |diff| = {diff:.2e} (<= 1e-4 ok); timing...",
                  flush=True)
            subject, peer = f"lorakit r=8 {tag}", f"PEFT r=8 {tag}"
            res = summarise(timer({subject: logits_fn(lk, ids), peer: logits_fn(pf, ids)}), subject, peer)
            res["max_abs_logit_diff"] = diff
            comparisons.append(dict(group="lorakit vs PEFT", subject=subject, peer=peer,
                                    target=LORAKIT_VS_PEFT_TARGET, target_text="<= 1.05", **res))
            del lk, pf
            gc.collect()

        # 2. merged lorakit vs the bare base model.
        base_fn = logits_fn(base, ids)
        reference = with_lorakit_adapter(base, "all-linear", args.seed)
        with torch.inference_mode():
            expected = reference(input_ids=ids, use_cache=False).logits.float()
        merged = reference  # merged in place: wrappers stay, forward skips the adapter
        lorakit.merge_adapter(merged)
        unloaded = lorakit.merge_and_unload(with_lorakit_adapter(base, "all-linear", args.seed))
        scale = expected.abs().max().item()
        for tag, model in (("merge_adapter", merged), ("merge_and_unload", unloaded)):
            diff = max_abs_diff(logits_fn(model, ids), lambda: expected)
            assert diff <= 1e-3 * max(1.0, scale), f"{tag}: merged logits differ from unmerged by {diff:.3g}"
            print(f"[{tag}] merged vs unmerged fp32 logits: max |diff| = {diff:.2e}; timing...", flush=True)
            subject, peer = f"lorakit all-linear after {tag}", "base model (no adapter)"
            res = summarise(timer({subject: logits_fn(model, ids), peer: base_fn}), subject, peer)
            res["max_abs_logit_diff_vs_unmerged"] = diff
            comparisons.append(dict(group="merged vs base", subject=subject, peer=peer,
                                    target=merged_target, target_text=merged_text, **res))
    elapsed = time.perf_counter() - t0

    for c in comparisons:
        # Verdict on the per-round ratio (pairs measured under the same machine state); both shown.
        c["verdict"] = "PASS" if c["median_per_round_ratio"] <= c["target"] else "FAIL"

    # --- report ------------------------------------------------------------------------------------------
    info = machine_info(device, threads)
    header = ("contender", "median ms", "peer", "peer ms", "ratio of medians", "per-round ratio (IQR)",
              "redone", "target", "verdict")
    rows = [(c["subject"], f"{c['median_ms'][c['subject']]:.1f}", c["peer"], f"{c['median_ms'][c['peer']]:.1f}",
             f"{c['ratio_of_medians']:.3f}",
             f"{c['median_per_round_ratio']:.3f} ({c['per_round_ratio_iqr'][0]:.2f}-{c['per_round_ratio_iqr'][1]:.2f})",
             str(c["rounds_redone_for_contention"]) + (f" (+{c['contended_rounds_kept']} kept)"
                                                         if c["contended_rounds_kept"] else ""),
             c["target_text"], c["verdict"])
            for c in comparisons]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
    print()
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print()
    print(f"command: {command}")
    print(f"machine: {info['cpu']}, nproc {info['nproc']}, torch {info['torch']} ({threads} threads), "
          f"transformers {info.get('transformers')}, peft {info.get('peft')}, device {device}")
    print(f"model: {n_params / 1e6:.1f}M params, input {args.batch} x {args.seq_len}, {args.dtype}, "
          f"{args.rounds} rounds; benchmark time {elapsed:.0f} s")
    print("verdict: on the per-round ratio; 'redone': rounds measured again because other processes used "
          "the CPU" + ("" if comparisons[0]["contention_detection"] else " (no /proc: detection off)"))
    if args.quick:
        print("quick run: a smoke test; its tiny model measures per-call overhead, so its verdicts mean little")

    if args.json:
        out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": command, "machine": info,
               "settings": {"quick": args.quick, "dtype": args.dtype, "rounds": args.rounds, "warmup": args.warmup,
                            "batch": args.batch, "seq_len": args.seq_len, "params": n_params,
                            "model_config": {k: getattr(config, k) for k in (
                                "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "vocab_size")}},
               "elapsed_s": elapsed, "comparisons": comparisons}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"figures written to {args.json}")
    failed = [c["subject"] for c in comparisons if c["verdict"] != "PASS"]
    if failed and args.strict:
        print(f"--strict: {len(failed)} comparison(s) missed the target: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
