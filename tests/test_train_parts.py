"""The reporting and pre-flight parts of training: metrics file, progress bar, curves plot, memory
estimate and pre-flight, end-of-run summary."""

import json
import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch

import lorakit
from lorakit.errors import TrainError
from lorakit.train.memory import (MemoryEstimate, _cgroup_available, available_memory, estimate_training_memory,
                                  preflight)
from lorakit.train.metrics import MetricsLog, Progress
from lorakit.train.plot import plot_curves
from lorakit.train.summary import human_summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- metrics file ------------------------------------------------------------------------------------------
def test_metrics_log_writes_one_json_object_per_line(tmp_path):
    log = MetricsLog(tmp_path)
    log.log({"step": 1, "kind": "train", "loss": 2.5, "lr": 1e-4})
    log.log({"step": 1, "kind": "eval", "loss": 2.7, "exact_match": 0.25})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # flushed line by line: readable before close
    first = json.loads(lines[0])
    assert first["step"] == 1 and first["kind"] == "train" and first["loss"] == 2.5
    assert abs(first["time"] - time.time()) < 60
    assert [r["kind"] for r in log.records()] == ["train", "eval"]
    log.close()


def test_metrics_log_writes_nan_as_null_and_rejects_records_without_step_or_kind(tmp_path):
    log = MetricsLog(tmp_path)
    log.log({"step": 3, "kind": "train", "loss": float("nan")})
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] is None
    with pytest.raises(ValueError):
        log.log({"step": 4, "loss": 1.0})
    with pytest.raises(ValueError):
        log.log({"kind": "train", "loss": 1.0})
    log.close()


def test_resume_drops_steps_after_the_checkpoint_and_appends(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 6):
        log.log({"step": step, "kind": "train", "loss": 1.0 / step})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "kind": "tr')  # a line cut short by a crash

    log = MetricsLog(tmp_path, resume_step=3)
    assert [r["step"] for r in log.records()] == [1, 2, 3]
    log.log({"step": 4, "kind": "train", "loss": 0.3})
    assert [r["step"] for r in log.records()] == [1, 2, 3, 4]
    log.close()
    assert not list(tmp_path.glob("*.tmp"))

    MetricsLog(tmp_path).close()  # no resume: a fresh file
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_disabled_metrics_log_and_progress_do_nothing(tmp_path, capsys):
    log = MetricsLog(tmp_path / "out", enabled=False, resume_step=2)
    log.log({"step": 1, "kind": "train", "loss": 1.0})
    assert log.records() == []
    log.close()
    assert not (tmp_path / "out").exists()

    bar = Progress(10, enabled=False)
    bar.update(1, loss=1.0, tokens_per_second=100.0, lr=1e-4)
    bar.write("hidden")
    bar.close()
    assert capsys.readouterr().err == ""


def test_progress_shows_steps_loss_and_messages(capsys):
    bar = Progress(10, initial=2)
    bar.update(3, loss=1.2345, tokens_per_second=5230.0, lr=2e-4)
    bar.write("eval at step 3: loss 1.1")
    bar.update(10, loss=0.5, tokens_per_second=5000.0, lr=1e-4)
    bar.close()
    err = capsys.readouterr().err
    assert "eval at step 3: loss 1.1" in err
    assert "10/10" in err and "loss=0.5000" in err and "5,000" in err


# --- plot --------------------------------------------------------------------------------------------------
def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    assert not list(path.parent.glob("*.tmp"))


def test_plot_writes_a_png_of_loss_and_exact_match(tmp_path):
    records = [{"step": s, "kind": "train", "loss": 3.0 / s} for s in range(1, 51)]
    records += [{"step": s, "kind": "eval", "loss": 3.2 / (s + 1), "exact_match": min(1.0, s / 40)} for s in (0, 25, 50)]
    path = plot_curves(records, tmp_path / "plots" / "curves.png")
    assert path == tmp_path / "plots" / "curves.png"
    _assert_png(path)


@pytest.mark.parametrize("records", [
    [{"step": s, "kind": "train", "loss": 1.0 / s} for s in range(1, 20)],  # no eval records
    [{"step": 1, "kind": "train", "loss": 2.0}],  # a single record
    [{"step": 1, "kind": "train", "loss": float("nan")}, {"step": 2, "kind": "train", "loss": None},
     {"step": 3, "kind": "train", "loss": 1.0}, {"step": 3, "kind": "eval", "loss": float("nan"),
                                                 "exact_match": float("nan")}],  # NaN / null values
    [],  # nothing logged
], ids=["no-eval", "single", "nan", "empty"])
def test_plot_copes_with_missing_and_bad_values(tmp_path, records):
    _assert_png(plot_curves(records, tmp_path / "curves.png"))


# --- memory ------------------------------------------------------------------------------------------------
def _lora_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(**{"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "max_position_embeddings": 256, **overrides})
    model = LlamaForCausalLM(config)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return model


def test_estimate_counts_weights_adapters_and_activations():
    model = _lora_llama()
    trainable, _ = lorakit.trainable_parameters(model)
    kwargs = dict(trainable_params=trainable, batch_size=4, seq_len=64)
    full = estimate_training_memory(model, autocast_dtype=None, gradient_checkpointing=False, **kwargs)
    assert full.weights >= sum(p.numel() * 4 for p in model.parameters())
    assert full.trainable == trainable * 4
    assert (full.gradients, full.optimizer) == (trainable * 4, trainable * 8)
    assert full.total == full.weights + full.gradients + full.optimizer + full.activations
    logits_floor = 3 * 4 * 64 * 512 * 4  # log-softmax output and two gradients over the vocabulary
    assert full.activations > logits_floor
    checkpointed = estimate_training_memory(model, autocast_dtype=None, gradient_checkpointing=True, **kwargs)
    half = estimate_training_memory(model, autocast_dtype=torch.bfloat16, gradient_checkpointing=False, **kwargs)
    assert checkpointed.activations < full.activations and half.activations < full.activations
    longer = estimate_training_memory(model, autocast_dtype=None, gradient_checkpointing=False,
                                      trainable_params=trainable, batch_size=4, seq_len=128)
    assert longer.activations > 1.9 * full.activations


MEASURE = textwrap.dedent("""
    import json, resource
    import psutil, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    import lorakit
    from lorakit.train.memory import estimate_training_memory

    torch.set_num_threads(1)
    warm = torch.nn.Linear(8, 8)  # torch's lazy initialisation is runtime, not training memory
    warm(torch.randn(2, 8, requires_grad=True)).sum().backward()
    ids = torch.randint(0, 4096, (8, 128))
    before = psutil.Process().memory_info().rss
    try:  # reset the peak (VmHWM) to the current resident size
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024,
                                         num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    trainable, _ = lorakit.trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):  # the second step holds the optimizer's state too
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss

    peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]
    measured = int(peak) * 1024 - before
    estimate = estimate_training_memory(model, trainable_params=trainable, batch_size=8, seq_len=128,
                                        autocast_dtype=None, gradient_checkpointing=False)
    print(json.dumps({"estimate": estimate.total, "measured": measured}))
""")


def test_estimate_is_close_to_measured_peak_memory():
    """One process, two AdamW steps of LoRA training at batch 8 x 128: the estimate against the growth of
    its peak resident memory (large allocations mapped directly, so freed memory leaves RSS)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = result["estimate"] / result["measured"]
    print(f"memory estimate {result['estimate'] / 1e6:.1f} MB vs measured peak {result['measured'] / 1e6:.1f} MB: "
          f"ratio {ratio:.3f}")
    assert 0.5 < ratio < 2.0


def test_preflight_refuses_what_does_not_fit_and_names_the_sizes():
    estimate = MemoryEstimate(weights=int(3e9), trainable=int(4e6), gradients=int(4e6), optimizer=int(8e6),
                              activations=int(2.5e9), total=int(5.512e9))
    preflight(estimate, available=int(8e9))
    with pytest.raises(TrainError) as refused:
        preflight(estimate, available=int(6e9))  # fits, but not with the 10% margin
    message = str(refused.value)
    for expected in ("5.51 GB", "weights 3.00 GB", "gradients 4.0 MB", "optimizer 8.0 MB", "activations 2.50 GB",
                     "6.00 GB", "--batch-size", "--max-length", "--gradient-checkpointing", "--quantize nf4"):
        assert expected in message


def test_available_memory_on_cpu_and_cgroup_limits(tmp_path):
    assert 0 < available_memory(torch.device("cpu")) <= psutil.virtual_memory().total

    membership = tmp_path / "cgroup"
    membership.write_text("0::/jobs/run\n")
    run = tmp_path / "fs" / "jobs" / "run"
    run.mkdir(parents=True)
    (run / "memory.max").write_text("1000000000\n")
    (run / "memory.current").write_text("300000000\n")
    (run / "memory.stat").write_text("anon 200000000\ninactive_file 50000000\n")
    (run.parent / "memory.max").write_text("max\n")
    assert _cgroup_available(tmp_path / "fs", membership) == 1_000_000_000 - 300_000_000 + 50_000_000
    (run.parent / "memory.max").write_text("500000000\n")  # a tighter limit above
    (run.parent / "memory.current").write_text("400000000\n")
    assert _cgroup_available(tmp_path / "fs", membership) == 100_000_000
    (run / "memory.max").write_text("max\n")
    (run.parent / "memory.max").write_text("max\n")
    assert _cgroup_available(tmp_path / "fs", membership) is None


# --- summary -----------------------------------------------------------------------------------------------
REPORT = {"tokens_per_second": 5230.4, "peak_memory_mb": 812.3, "trainable_params": 327680, "total_params": 5_700_000,
          "adapter_bytes": 1_230_000, "seconds": 161.2, "steps": 300, "output_dir": "runs/skill",
          "eval_before": {"loss": 3.912, "perplexity": 49.9, "exact_match": 0.02},
          "eval_after": {"loss": 0.1213, "perplexity": 1.129, "exact_match": 0.965}}


def test_summary_reads_like_the_end_of_a_run():
    assert human_summary(REPORT) == (
        "trained 300 steps in 2m 41s (5,230 tokens/s, peak 812 MB)\n"
        "adapter: 1.2 MB, 327,680 trainable of 5.7M params (5.7%)\n"
        "held-out exact match: 2.0% -> 96.5%; loss 3.91 -> 0.121 (perplexity 49.9 -> 1.13)\n"
        "wrote runs/skill")


def test_summary_leaves_out_what_the_report_lacks():
    assert human_summary({}) == ""
    partial = {"steps": 5, "eval_after": {"loss": 0.5, "perplexity": float("nan")}, "adapter_bytes": None}
    assert human_summary(partial) == "trained 5 steps\nheld-out loss 0.5"
    assert "exact match: 40.0%" in human_summary({"eval_after": {"exact_match": 0.4}})
    assert human_summary({"seconds": 3725, "tokens_per_second": 10}) == "trained in 1h 02m (10 tokens/s)"
