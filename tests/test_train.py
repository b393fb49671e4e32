"""`lorakit train` end to end on a tiny model folder: outputs, resume to the bit, atomic checkpoints, bad input.

The training runs are real `lorakit` subprocesses (killed with SIGKILL where the test needs it) on a
tiny Llama saved to disk with a ChatML tokenizer, and data files written into tmp_path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorakit import Adapter
from tiny_models import tiny_chat_tokenizer


def lorakit(*args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def train_args(model_folder, skill_files, output, *extra):
    return ["train", "--model", model_folder, "--data", skill_files["train"], "--eval-data", skill_files["heldout"],
            "--output", output, "--batch-size", 4, "--max-length", 64, "--lr", 1e-2, "--eval-samples", 4,
            "--no-progress", *extra]


def test_a_run_writes_a_peft_adapter_report_metrics_and_plot(model_folder, skill_files, tmp_path):
    out = tmp_path / "run"
    result = lorakit(*train_args(model_folder, skill_files, out, "--max-steps", 6, "--eval-steps", 3,
                                 "--save-steps", 3, "--logging-steps", 1, "--precision", "fp32"))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "train_report.json").read_text())
    for key in ("tokens_per_second", "peak_memory_mb", "trainable_params", "total_params", "adapter_bytes"):
        assert report[key] > 0, key
    assert {"loss", "perplexity", "exact_match"} <= set(report["eval_before"]) & set(report["eval_after"])
    assert report["eval_after"]["loss"] < report["eval_before"]["loss"]
    assert report["adapter_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    config = json.loads((out / "train_config.json").read_text())
    assert config["data"] == str(Path(skill_files["train"]).resolve()) and config["max_steps"] == 6
    assert config["precision"] == "fp32"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 3, 6]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "exact match" in result.stderr  # the human summary

    # The adapter is a PEFT adapter: PEFT loads it and reproduces lorakit's own scoring.
    base = AutoModelForCausalLM.from_pretrained(model_folder)
    peft_model = peft.PeftModel.from_pretrained(base, out)
    assert isinstance(peft_model, peft.PeftModel)
    scored = lorakit("eval", "--model", model_folder, "--adapter", out, "--data", skill_files["heldout"],
                     "--samples", 4, "--json")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["loss"] == pytest.approx(report["eval_after"]["loss"], rel=1e-3, abs=1e-3)


def _wait_for_checkpoint(output: Path, step: int, process: subprocess.Popen, timeout: float = 180) -> None:
    pointer = output / "checkpoints" / "latest.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= step:
            return
        if process.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {process.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step} within {timeout}s")


# Dropout, accumulation and LoRA+ all on: every piece of state a resume must restore is in play. A fixed
# thread count: one that follows the machine's load would round differently from run to run.
RESUME_SETTINGS = ["--max-steps", 12, "--save-steps", 2, "--eval-steps", 100, "--lora-dropout", 0.1,
                   "--precision", "fp32", "--gradient-accumulation-steps", 2, "--lora-plus-ratio", 4, "--threads", 1]


@pytest.fixture(scope="module")
def uninterrupted(model_folder, skill_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert lorakit(*train_args(model_folder, skill_files, out, *RESUME_SETTINGS)).returncode == 0
    return out


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGINT])
def test_a_stopped_run_resumes_to_the_bit_identical_adapter(stop_signal, uninterrupted, model_folder, skill_files,
                                                            tmp_path):
    """SIGKILL: the last checkpoint survives. SIGINT (Ctrl-C): the run stops after the current step and saves."""
    straight, stopped = uninterrupted, tmp_path / "stopped"
    args = train_args(model_folder, skill_files, stopped, *RESUME_SETTINGS)
    process = subprocess.Popen([sys.executable, "-m", "lorakit.cli", *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(stopped, 4, process)
    process.send_signal(stop_signal)
    _, stderr = process.communicate(timeout=120)
    assert not (stopped / "adapter_model.safetensors").exists()  # it really stopped before the end
    if stop_signal == signal.SIGINT:
        assert process.returncode == 2 and "interrupted at step" in stderr and "Traceback" not in stderr
    resumed = lorakit(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr

    a, b = load_file(straight / "adapter_model.safetensors"), load_file(stopped / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps))  # no step logged twice after the resume


def test_a_half_written_checkpoint_never_becomes_the_latest(model_folder, skill_files, tmp_path):
    out = tmp_path / "run"
    args = train_args(model_folder, skill_files, out, "--max-steps", 4, "--save-steps", 2, "--precision", "fp32")
    assert lorakit(*args).returncode == 0
    checkpoints = out / "checkpoints"
    # A kill during a write leaves a folder under its temporary name, with files missing or cut short.
    torn = checkpoints / ".tmp-step-000006"
    torn.mkdir()
    (torn / "trainable.safetensors").write_bytes(b"\x00" * 10)
    assert json.loads((checkpoints / "latest.json").read_text())["path"] == "step-000004"
    resumed = lorakit(*args[:-4], "--max-steps", 6, "--save-steps", 2, "--precision", "fp32", "--resume")
    assert resumed.returncode != 0 and "max_steps" in resumed.stderr  # the schedule depends on max_steps
    again = lorakit(*args, "--resume")
    assert again.returncode == 0, again.stderr
    assert not torn.exists() or json.loads((checkpoints / "latest.json").read_text())["path"] == "step-000004"


def test_gradient_accumulation_weighs_every_token_the_same(model_folder):
    from lorakit.core import LoraConfig, add_adapter
    from lorakit.data import BatchPlan, read_rows, tokenize_rows
    from lorakit.train.loss import labelled_token_loss, reference_token_loss

    tokenizer = tiny_chat_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_folder)
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    rows = [{"prompt": "a" * (3 + i), "completion": " b" * (1 + 3 * i)} for i in range(4)]
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"accum-{os.getpid()}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, _ = tokenize_rows(read_rows(path), tokenizer, 64)
    path.unlink()
    plan = BatchPlan(examples, batch_size=4, max_length=64, pad_id=tokenizer.pad_token_id, seed=0, packing=False)
    whole = plan.collate([[0], [1], [2], [3]])
    halves = [plan.collate([[0], [1]]), plan.collate([[2], [3]])]
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(batches):
        total = sum(b.label_tokens for b in batches)
        for b in batches:
            (labelled_token_loss(model, b) / total).backward()
        out = [p.grad.clone() for p in params]
        model.zero_grad()
        return out

    for g_whole, g_split in zip(grads([whole]), grads(halves)):
        torch.testing.assert_close(g_whole, g_split, atol=1e-6, rtol=1e-5)
    # The fast loss (logits only where there is a label) equals the plain one.
    with torch.no_grad():
        torch.testing.assert_close(labelled_token_loss(model, whole), reference_token_loss(model, whole),
                                   atol=1e-4, rtol=1e-5)


def test_merge_writes_a_model_transformers_loads_with_the_same_outputs(model_folder, skill_files, tmp_path):
    out = tmp_path / "run"
    assert lorakit(*train_args(model_folder, skill_files, out, "--max-steps", 2, "--precision", "fp32")).returncode == 0
    merged = tmp_path / "merged"
    result = lorakit("merge", "--model", model_folder, "--adapter", out, "--output", merged)
    assert result.returncode == 0, result.stderr
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    base = AutoModelForCausalLM.from_pretrained(model_folder)
    expected = peft.PeftModel.from_pretrained(base, out)(input_ids=ids).logits
    got = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert lorakit("merge", "--model", model_folder, "--adapter", out, "--output", merged).returncode == 2


def test_generate_prints_a_continuation(model_folder, skill_files, tmp_path):
    result = lorakit("generate", "--model", model_folder, "--max-new-tokens", 4, "Reverse the words: a b\nAnswer:")
    assert result.returncode == 0, result.stderr
    assert lorakit("generate", "--model", model_folder, "--chat", "--max-new-tokens", 4, "hello").returncode == 0


@pytest.mark.parametrize("case, expected", [
    ("occupied", "already holds a training run"),
    ("unknown_model", "not found"),
    ("bad_row", ":3"),
    ("missing_field", "completion"),
    ("too_long_refused", "max-length"),
    ("bad_yaml_key", "did you mean 'lora_alpha'"),
    ("resume_changed", "lr"),
    ("bad_value", "batch_size"),
])
def test_a_users_mistake_gets_one_clear_line_and_loses_nothing(case, expected, model_folder, skill_files, tmp_path):
    out = tmp_path / "run"
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "p", "completion": " c"}\n' * 2)
    args = train_args(model_folder, skill_files, out, "--max-steps", 1)
    if case in ("occupied", "resume_changed"):
        assert lorakit(*args).returncode == 0
        before = (out / "adapter_model.safetensors").read_bytes()
        args = args + (["--lr", 0.5, "--resume"] if case == "resume_changed" else [])
    elif case == "unknown_model":
        args[2] = tmp_path / "no-such-model"
    elif case == "bad_row":
        data.write_text('{"prompt": "p", "completion": " c"}\n' * 2 + '{"prompt": "p", "completion": \n')
        args[4] = data
    elif case == "missing_field":
        data.write_text('{"prompt": "p"}\n')
        args[4] = data
    elif case == "too_long_refused":
        data.write_text(json.dumps({"prompt": "word " * 200, "completion": " c"}) + "\n")
        args = args[:4] + [data] + args[5:] + ["--on-overflow", "refuse"]
    elif case == "bad_yaml_key":
        config = tmp_path / "run.yaml"
        config.write_text("lora-alpah: 32\n")
        args = ["train", config] + args[1:]
    elif case == "bad_value":
        args = args + ["--batch-size", 0]
    result = lorakit(*args)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    if case in ("occupied", "resume_changed"):
        assert (out / "adapter_model.safetensors").read_bytes() == before


def _step_gradients(model_folder, **settings):
    from lorakit.data import BatchPlan, Row, tokenize_rows
    from lorakit.train.config import TrainConfig
    from lorakit.train.loss import labelled_token_loss
    from lorakit.train.precision import autocast
    from lorakit.train.setup import Runtime, build_model

    config = TrainConfig(model=str(model_folder), r=4, **settings)
    model = build_model(config, Runtime(), config.precision)
    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert checkpointed == config.gradient_checkpointing
    tokenizer = tiny_chat_tokenizer()
    rows = [Row({"prompt": f"item {i}:", "completion": f" value {i}"}, f"memory:{i}") for i in range(6)]
    examples, _ = tokenize_rows(rows, tokenizer, 64)
    plan = BatchPlan(examples, batch_size=2, max_length=64, pad_id=tokenizer.pad_token_id, seed=0)
    batch = plan.collate(plan.epoch(0)[0])
    with autocast(config.precision, torch.device("cpu")):
        loss = labelled_token_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_computes_the_same_gradients(model_folder):
    loss, grads = _step_gradients(model_folder, precision="fp32")
    loss_ckpt, grads_ckpt = _step_gradients(model_folder, precision="fp32", gradient_checkpointing=True)
    assert loss == pytest.approx(loss_ckpt, abs=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ckpt[name], atol=1e-6, rtol=1e-5)


def test_bf16_keeps_the_adapter_in_fp32_and_stays_close_to_fp32(model_folder):
    loss, grads = _step_gradients(model_folder, precision="fp32")
    loss_bf16, grads_bf16 = _step_gradients(model_folder, precision="bf16")
    assert all(g.dtype == torch.float32 for g in grads_bf16.values())
    assert loss_bf16 == pytest.approx(loss, rel=2e-2)


def test_auto_precision_resolves_to_what_this_cpu_runs_faster():
    from lorakit.train.precision import bf16_is_faster, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if bf16_is_faster("cpu") else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"


def test_the_default_run_needs_nothing_but_an_output_folder(tmp_path):
    """No --model, no --data: the embedded model and the reverse_words skill (cut to a few steps here)."""
    out = tmp_path / "run"
    result = lorakit("train", "--output", out, "--max-steps", 3, "--eval-samples", 4, "--no-progress")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "train_config.json").read_text())
    assert config["model"] is None and config["skill"] == "reverse_words"
    assert Path(config["data"]) == (out / "data" / "reverse_words" / "train.jsonl").resolve()
    # The embedded base is named as lorakit's --model takes it, not by this machine's site-packages path.
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "lorakit-embedded"
    assert Adapter.read(out).base.source == "embedded"


def test_chat_rows_train_and_are_scored_through_the_chat_template(model_folder, skill_files, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", model_folder, "--data", skill_files["train_chat"], "--eval-data",
            skill_files["heldout_chat"], "--output", out, "--batch-size", 4, "--max-length", 64, "--max-steps", 2,
            "--eval-samples", 3, "--no-progress"]
    result = lorakit(*args)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "train_report.json").read_text())
    assert report["eval_after"]["exact_match_samples"] == 3
