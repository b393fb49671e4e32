"""`lorakit estimate`: the published figures it must reproduce, counts against real models, the embedded
model's estimate against a measured training run, and bad input.

Paper figures: LoRA (Hu et al. 2021) §4.2 and Table 4 on GPT-3 175B; QLoRA (Dettmers et al. 2023) §1 on
LLaMA-65B. The CLI cases are real `python -m lorakit.cli estimate` subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import lorakit
from lorakit.data.skills import write_skill
from lorakit.errors import ConfigError, ModelError, TargetError
from lorakit.estimate import Setup, architecture_from_config, estimate, read_architecture
from lorakit.estimate.report import parse_size, verdict
from lorakit.train.memory import estimate_training_memory

ROOT = Path(__file__).resolve().parents[1]


def lorakit_estimate(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit.cli", "estimate", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def estimate_json(*args) -> dict:
    done = lorakit_estimate(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# --- the LoRA paper: GPT-3 175B ------------------------------------------------------------------------------
def test_gpt3_lora_r4_on_q_v_is_the_papers_18_9m_parameters_and_35mb_checkpoint():
    """§4.2: r = 4 on W_q and W_v shrinks the checkpoint 'from 350GB to 35MB' (2·96·2·12288·4 parameters)."""
    out = estimate_json("--model", "gpt3-175b", "--r", 4, "--target-modules", "q", "v", "--batch-size", 1,
                        "--max-length", 2048)
    assert out["trainable_parameters"] == 18_874_368
    assert out["adapter_file_bytes"] == 18_874_368 * 2 == 37_748_736       # fp16: 37.7 MB, the paper's "35MB"
    assert out["model_file_bytes"] == pytest.approx(350e9, rel=0.01)        # the paper's "350GB"
    assert 9_000 < out["model_file_bytes"] / out["adapter_file_bytes"] < 10_000   # "roughly 10,000x"
    assert out["training_bytes"]["weights"] == pytest.approx(350e9, rel=0.01)  # LoRA's "350GB" of training VRAM
    for key in ("parameters", "trainable_parameters", "quantized_parameters", "adapter_file_bytes",
                "model_file_bytes", *(f"training_bytes.{k}" for k in out["training_bytes"]),
                *(f"inference_bytes.{k}" for k in out["inference_bytes"])):
        section, _, name = key.partition(".")
        value = out[section][name] if name else out[section]
        assert type(value) is int, key
    assert out["setup"]["target_modules"] == ["attn.q", "attn.v"]
    assert out["verdict"] is None and out["fits"] is None


@pytest.mark.parametrize("r, table_4", [(1, 4.7e6), (8, 37.7e6)])
def test_gpt3_table_4_lora_rows(r, table_4):
    footprint = estimate(read_architecture("gpt3-175b"), Setup(r=r, target_modules=["q", "v"], max_length=2048))
    assert footprint.trainable == r * 4_718_592
    assert round(footprint.trainable / 1e6, 1) == table_4 / 1e6


def test_gpt3_full_fine_tune_is_within_half_a_percent_of_table_4():
    """Table 4: 175,255.8M trainable. A gpt2-style count (tied head) gives 174,604.3M, 0.37% fewer."""
    footprint = estimate(read_architecture("gpt3-175b"), Setup(method="full", max_length=2048))
    assert footprint.trainable == footprint.parameters == 174_604_259_328
    assert footprint.trainable / 175_255.8e6 == pytest.approx(1, abs=0.005)
    assert footprint.adapter_file is None


# --- the QLoRA paper: LLaMA-65B ------------------------------------------------------------------------------
def test_llama_65b_qlora_fine_tunes_in_under_48gb_where_16_bit_full_fine_tuning_needs_over_780gb():
    """§1: '>780GB of GPU memory to <48GB'. QLoRA's own setting: LoRA r = 64 on every linear layer, bf16
    adapters (the paper's code casts them to bf16), batch 1 x 512 with gradient checkpointing."""
    qlora = estimate_json("--model", "llama-65b", "--method", "qlora", "--r", 64, "--batch-size", 1,
                          "--max-length", 512, "--gradient-checkpointing", "--adapter-dtype", "bf16",
                          "--device-memory", "48GB")
    assert qlora["parameters"] == pytest.approx(65.2e9, rel=0.005)
    assert qlora["trainable_parameters"] == 80 * 64 * (4 * (8192 + 8192) + 3 * (8192 + 22016))
    bits = 4 + 8 / 64 + 32 / (64 * 256)                                        # NF4 + double quantization
    assert round(bits, 3) == 4.127
    nf4 = qlora["quantized_parameters"] * bits / 8
    assert qlora["training_bytes"]["weights"] == pytest.approx(
        nf4 + (qlora["parameters"] - qlora["quantized_parameters"]) * 2 + qlora["trainable_parameters"] * 2, abs=1)
    assert qlora["training_bytes"]["total"] < 48e9
    assert qlora["fits"] is True

    full = estimate(read_architecture("llama-65b"), Setup(method="full", batch_size=1, max_length=512,
                                                          gradient_checkpointing=True))
    assert full.training["total"] > 780e9
    assert full.training["weights"] + full.training["gradients"] + 8 * full.trainable > 780e9  # even sans master


def test_fp32_adapters_cost_two_more_bytes_per_trainable_parameter_in_weights_and_gradients():
    arch = read_architecture("llama-65b")
    setups = [Setup(method="qlora", r=64, adapter_dtype=d, batch_size=1, max_length=512) for d in ("bf16", "fp32")]
    half, full = (estimate(arch, s) for s in setups)
    assert full.training["total"] - half.training["total"] == 2 * 2 * half.trainable


# --- counts against real models ------------------------------------------------------------------------------
TINY = {
    "llama (GQA)": LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2),
    "llama (biases, tied)": LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, attention_bias=True, mlp_bias=True,
                                        tie_word_embeddings=True),
    "mistral": MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1),
    "qwen2": Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2),
    "qwen3": Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "gpt2": GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                       eos_token_id=0),
}


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("targets", ["all-linear", "attention"])
def test_counts_equal_the_built_model_and_lorakits_adapter(name, targets):
    config = TINY[name]
    targets = targets if targets == "all-linear" else (["c_attn"] if name == "gpt2" else ["q_proj", "v_proj"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    arch = architecture_from_config(config.to_dict(), name)
    assert arch.parameters == sum(p.numel() for p in model.parameters())
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=targets))
    assert estimate(arch, Setup(r=4, target_modules=targets, max_length=32)).trainable == \
        lorakit.trainable_parameters(model)[0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_activations_are_the_train_preflight_formula(precision, checkpointing, attention):
    """The same model as `lorakit train` builds it (frozen base in bf16 under bf16 autocast, fp32 adapters):
    the config-only estimate equals the pre-flight's, which reads the built model."""
    config = TINY["llama (GQA)"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.set_attn_implementation(attention)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    if precision == "bf16":
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.bfloat16()
    trainable, _ = lorakit.trainable_parameters(model)
    preflight = estimate_training_memory(model, trainable_params=trainable, batch_size=4, seq_len=64,
                                         autocast_dtype=torch.bfloat16 if precision == "bf16" else None,
                                         gradient_checkpointing=checkpointing)
    ours = estimate(architecture_from_config(config.to_dict(), "tiny"),
                    Setup(r=4, batch_size=4, max_length=64, dtype=precision, attention=attention,
                          gradient_checkpointing=checkpointing)).training
    assert ours["activations"] == preflight.activations
    assert (ours["gradients"], ours["optimizer"]) == (preflight.gradients, preflight.optimizer)
    assert 0 <= preflight.weights - ours["weights"] <= 64   # the pre-flight also counts rotary's buffer


# --- the embedded model against a measured run ---------------------------------------------------------------
MEASURE = textwrap.dedent("""
    import gc, json, sys
    import psutil
    import lorakit.cli

    data, out, batch, length = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]

    def train(output, batch, length, steps):
        code = lorakit.cli.main(["train", "--data", data + "/train.jsonl", "--eval-data", data + "/heldout.jsonl",
                                 "--output", output, "--batch-size", str(batch), "--max-length", str(length),
                                 "--max-steps", str(steps), "--precision", "fp32", "--eval-samples", "0",
                                 "--no-progress"])
        assert code == 0

    train(out + "-warm", 1, 16, 1)  # imports and torch's lazy set-up: the runtime, not training memory
    gc.collect()
    before = psutil.Process().memory_info().rss
    try:  # reset the peak (VmHWM) to the current resident size
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass
    train(out, batch, length, 2)  # the second step holds the optimizer's state too
    peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]
    report = json.load(open(out + "/train_report.json"))
    print(json.dumps({"measured": int(peak) * 1024 - before, "preflight": report["memory_estimate_mb"] * 2**20}))
""")


def test_embedded_model_estimate_is_within_25_percent_of_a_measured_training_run(tmp_path):
    """A real `lorakit train` (two AdamW steps of 16 x 256 tokens, fp32) in a subprocess: the growth of its
    peak resident memory from just before the run (large allocations mapped directly, so freed memory leaves
    RSS), against `lorakit estimate` for the same settings. One thread: the thread count leaves tensor memory
    alone, and on a busy machine a second thread makes each step wait on the slowest core."""
    data = tmp_path / "data"
    write_skill("reverse_words", data, n_train=600, n_heldout=4, seed=0)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(data), str(tmp_path / "run"), "16", "256"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])

    out = estimate_json("--batch-size", 16, "--max-length", 256, "--dtype", "fp32", "--adapter-dtype", "fp32")
    estimated = out["training_bytes"]["total"]
    print(f"embedded model, 16 x 256, fp32: estimate {estimated / 2**20:.1f} MiB, measured peak "
          f"{run['measured'] / 2**20:.1f} MiB (ratio {estimated / run['measured']:.3f}), lorakit train's "
          f"pre-flight {run['preflight'] / 2**20:.1f} MiB")
    assert estimated == pytest.approx(run["measured"], rel=0.25)
    assert estimated == pytest.approx(run["preflight"], rel=0.01)  # one formula, read off config or model


# --- output, verdict, bad input ------------------------------------------------------------------------------
def test_readme_example_is_what_the_command_prints():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- estimate -->\n```bash\n(.*?)\n```\n\n```\n(.*?)```", readme, re.S)
    assert match, "README.md has no <!-- estimate --> command and output"
    command, printed = match.group(1).split(), match.group(2)
    assert command[:2] == [".venv/bin/lorakit", "estimate"]
    done = lorakit_estimate(*command[2:])
    assert done.returncode == 0, done.stderr
    assert done.stdout == printed
    assert "fits in 48 GB" in done.stdout


def test_verdict_says_what_is_spare_or_what_would_fit():
    arch = read_architecture(None)
    setup = Setup(batch_size=4, max_length=256)
    footprint = estimate(arch, setup)
    fits, line = verdict(arch, setup, footprint, parse_size("24GB"))
    assert fits and re.fullmatch(r"fits in 24 GB with [\d.]+ GB to spare \(training needs [\d.]+ MB\)", line)

    gpt3 = read_architecture("gpt3-175b")
    big = Setup(r=4, target_modules=["q", "v"], batch_size=1, max_length=2048)
    fits, line = verdict(gpt3, big, estimate(gpt3, big), parse_size("400GB"))
    assert not fits
    assert re.fullmatch(r"does not fit in 400 GB: training needs [\d.]+ GB; with --gradient-checkpointing it "
                        r"needs [\d.]+ GB", line)
    fits, line = verdict(gpt3, big, estimate(gpt3, big), parse_size("24GB"))
    assert not fits and "and even --gradient-checkpointing --method qlora needs" in line


def test_device_sizes():
    assert parse_size("24GB") == parse_size("24 gb") == parse_size("24") == 24 * 10**9
    assert parse_size("80GiB") == 80 * 2**30 and parse_size("512MB") == 512 * 10**6
    for bad in ("", "GB", "-1GB", "24XB", "0"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_targets_the_model_lacks_or_that_overlap_are_refused():
    gpt3, llama = read_architecture("gpt3-175b"), read_architecture("llama-65b")
    with pytest.raises(TargetError, match="did you mean q\\?"):
        estimate(gpt3, Setup(target_modules=["q_proj"]))
    with pytest.raises(TargetError, match="both attn.c_attn and its thirds"):
        estimate(gpt3, Setup(target_modules=["c_attn", "v"]))
    assert estimate(llama, Setup(r=4, target_modules=["q", "v"])).trainable == \
        estimate(llama, Setup(r=4, target_modules=["q_proj", "v_proj"])).trainable == 80 * 2 * 4 * 2 * 8192
    with pytest.raises(ConfigError, match="past the 2048 learned positions"):
        estimate(gpt3, Setup(max_length=4096))


def test_an_unknown_architecture_is_refused_naming_the_missing_fields(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "mamba", "d_model": 768, "n_layer": 24}))
    done = lorakit_estimate("--model", config)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert "'mamba' is not one lorakit estimate knows" in done.stderr
    assert "needs n_embd, n_head, vocab_size, n_positions, which it lacks" in done.stderr
    with pytest.raises(ModelError, match="needs num_hidden_layers, intermediate_size, vocab_size"):
        architecture_from_config({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}, "x")
    with pytest.raises(ModelError, match="hidden_size must be a positive whole number"):
        architecture_from_config({**TINY["llama (GQA)"].to_dict(), "hidden_size": "64"}, "x")


def test_a_model_that_does_not_exist_is_one_line(tmp_path):
    done = lorakit_estimate("--model", tmp_path / "nowhere" / "config.json")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"lorakit estimate: error: model '{tmp_path / 'nowhere' / 'config.json'}' not found: no such file or "
        "folder, not a preset (gpt3-175b, llama-65b), and not a hub id (owner/name)"]
