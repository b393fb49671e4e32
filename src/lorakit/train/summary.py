"""The lines printed before a training run starts, and the few printed at its end (from train_report.json).

Before (`run_header`):

    model lorakit-embedded: 6M params, fp32; adapter r=8 on all-linear: 231,936 trainable (3.9%)
    data: 2,000 rows, 38,172 tokens (train.jsonl), 200 held out (heldout.jsonl)
    batch: 4 rows x 256 tokens x 1 accumulation = 1,024 tokens/step; 1,000 steps = 10.5 passes over the data
    output: lorakit-run

After (`human_summary`):

    trained 300 steps in 2m 41s (5,230 tokens/s, peak 812 MB)
    adapter: 1.2 MB, 327,680 trainable of 5.7M params (5.7%)
    held-out exact match: 2.0% -> 96.5%; loss 3.91 -> 0.12 (perplexity 49.9 -> 1.13)
    wrote runs/skill

A missing key leaves out its part (a line with nothing left is dropped), never an error. Exact match is a
fraction in [0, 1].
"""

from __future__ import annotations

import math

from lorakit.train.memory import format_bytes


def human_summary(report: dict) -> str:
    lines = [_run_line(report), _adapter_line(report), _eval_line(report)]
    if report.get("output_dir"):
        lines.append(f"wrote {report['output_dir']}")
    return "\n".join(line for line in lines if line)


def _run_line(report: dict) -> str:
    steps, seconds = _number(report, "steps"), _number(report, "seconds")
    head = "trained" + (f" {steps:,.0f} steps" if steps is not None else "")
    if seconds is not None:
        head += f" in {format_duration(seconds)}"
    details = []
    if (tps := _number(report, "tokens_per_second")) is not None:
        details.append(f"{tps:,.0f} tokens/s")
    if (peak := _number(report, "peak_memory_mb")) is not None:
        details.append(f"peak {peak:,.0f} MB")
    if head == "trained" and not details:
        return ""
    return head + (f" ({', '.join(details)})" if details else "")


def _adapter_line(report: dict) -> str:
    parts = []
    if (size := _number(report, "adapter_bytes")) is not None:
        parts.append(format_bytes(size))
    trainable, total = _number(report, "trainable_params"), _number(report, "total_params")
    if trainable is not None:
        params = f"{trainable:,.0f} trainable"
        if total:
            params += f" of {_short_count(total)} params ({100 * trainable / total:.2g}%)"
        parts.append(params)
    return "adapter: " + ", ".join(parts) if parts else ""


def _eval_line(report: dict) -> str:
    before, after = report.get("eval_before") or {}, report.get("eval_after") or {}
    parts = []
    if (pair := _pair(before, after, "exact_match", lambda v: f"{100 * v:.1f}%")):
        parts.append(f"held-out exact match: {pair}")
    loss = _pair(before, after, "loss", lambda v: f"{v:.3g}")
    if loss:
        perplexity = _pair(before, after, "perplexity", lambda v: f"{v:.3g}")
        parts.append(f"loss {loss}" + (f" (perplexity {perplexity})" if perplexity else ""))
    if not parts:
        return ""
    line = "; ".join(parts)
    return line if line.startswith("held-out") else "held-out " + line


def _pair(before: dict, after: dict, key: str, show) -> str:
    """'a -> b', or just the one that exists ('-> b' for after only), or ''."""
    a, b = _number(before, key), _number(after, key)
    if a is None and b is None:
        return ""
    if b is None:
        return f"{show(a)} before training"
    return f"{show(a)} -> {show(b)}" if a is not None else show(b)


def _number(mapping: dict, key: str) -> float | None:
    value = mapping.get(key) if isinstance(mapping, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def format_duration(seconds: float) -> str:
    """'41s', '2m 41s', '1h 05m'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def _short_count(n: float) -> str:
    """5.7M, 1.1B, 35K (the scale of a model's parameter count)."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.2g}{suffix}" if n < 10 * size else f"{n / size:.0f}{suffix}"
    return f"{n:.0f}"


def run_header(*, model: str, precision: str, r: int, targets, trainable: int, total: int, rows: int, tokens: int,
               train_file: str, heldout: str, batch_size: int, max_length: int, accumulation: int, steps: int,
               batches_per_epoch: int, output: str, resumed_step: int | None = None, processes: int = 1) -> str:
    """What the run is about to do, in the words of its settings; `resumed_step` adds where it goes on from."""
    targets = targets if isinstance(targets, str) else ", ".join(targets)
    share = f" ({100 * trainable / total:.2g}%)" if total else ""
    passes = steps * accumulation * processes / max(batches_per_epoch, 1)
    spread = f" x {processes} processes" if processes > 1 else ""
    lines = [
        f"model {model}: {_short_count(total)} params, {precision}; adapter r={r} on {targets}: "
        f"{trainable:,} trainable{share}",
        f"data: {rows:,} rows, {tokens:,} tokens ({train_file}), {heldout}",
        f"batch: {batch_size} rows x {max_length} tokens x {accumulation} accumulation{spread} = "
        f"{batch_size * max_length * accumulation * processes:,} tokens/step; {steps:,} steps = {passes:.3g} passes "
        "over the data",
        f"output: {output}",
    ]
    if resumed_step is not None:
        lines.append(f"resuming from step {resumed_step:,} of {steps:,}")
    return "\n".join(lines)
