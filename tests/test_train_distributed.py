"""`lorakit train` on two processes (torchrun, gloo on the CPU) against the one-process run.

A run on 2 processes with gradient accumulation k equals the 1-process run with 2k: the same global
batches, token-exact loss, summed gradients. The runs are real subprocesses on a tiny Llama folder; each
saves a checkpoint halfway, which the resume tests continue on the other number of processes.

Run as a script (`torchrun ... tests/test_train_distributed.py coverage MODEL`), this file is the worker of
the gradient-coverage test: on rank 1 one adapted module is left out of the forward pass.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS, HALF = 6, 3
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def settings(model_folder, skill_files, output, *extra) -> list:
    return ["train", "--model", model_folder, "--data", skill_files["train"], "--eval-data", skill_files["heldout"],
            "--output", output, "--batch-size", 2, "--max-length", 64, "--lr", 1e-2, "--max-steps", STEPS,
            "--save-steps", HALF, "--eval-samples", 0, "--eval-steps", 100, "--logging-steps", 1,
            "--precision", "fp32", "--report-to", "none", "--no-progress", *extra]


def run(command: list, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=timeout, env=ENV,
                            cwd=cwd)
    return result


def trained(command: list) -> Path:
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(command[command.index("--output") + 1])


@pytest.fixture(scope="module")
def runs(model_folder, skill_files, tmp_path_factory) -> dict:
    """The 1-process run with accumulation 2, and DDP (torchrun) and FSDP (--nproc-per-node) on 2 processes."""
    root = tmp_path_factory.mktemp("runs")
    one = [sys.executable, "-m", "lorakit", *settings(model_folder, skill_files, root / "one",
                                                      "--gradient-accumulation-steps", 2)]
    ddp = [*TORCHRUN, "-m", "lorakit", *settings(model_folder, skill_files, root / "ddp", "--strategy", "ddp")]
    fsdp = [sys.executable, "-m", "lorakit", *settings(model_folder, skill_files, root / "fsdp", "--strategy", "fsdp",
                                                       "--nproc-per-node", 2)]
    return {"one": trained(one), "ddp": trained(ddp), "fsdp": trained(fsdp)}


def relative_difference(a: Path, b: Path) -> float:
    """max |a - b| over max |a|, over every tensor of two adapter folders (which must hold the same keys)."""
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x) / max(x[k].abs().max().item() for k in x)


def losses(output: Path) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_twice_the_accumulation(strategy, runs):
    assert relative_difference(runs["one"], runs[strategy]) <= 1e-5
    assert losses(runs[strategy]) == pytest.approx(losses(runs["one"]), rel=1e-6)
    report = json.loads((runs[strategy] / "train_report.json").read_text())
    assert report["processes"] == 2 and report["steps"] == STEPS
    assert report["tokens_seen"] == json.loads((runs["one"] / "train_report.json").read_text())["tokens_seen"]


def test_a_sharded_run_saves_whole_tensors_that_lorakit_and_peft_load(runs, model_folder):
    import peft
    from transformers import AutoModelForCausalLM

    from lorakit import load_adapter

    one, fsdp = runs["one"], runs["fsdp"]
    saved = load_file(fsdp / "adapter_model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in
                                                      load_file(one / "adapter_model.safetensors").items()}
    checkpoint = fsdp / "checkpoints" / f"step-{STEPS:06d}"
    whole = load_file(one / "checkpoints" / f"step-{STEPS:06d}" / "trainable.safetensors")
    for name in ("trainable", "optimizer"):
        got = load_file(checkpoint / f"{name}.safetensors")
        assert all(t.numel() > 0 for t in got.values())
    assert {k: v.shape for k, v in load_file(checkpoint / "trainable.safetensors").items()} == \
        {k: v.shape for k, v in whole.items()}
    assert set(load_file(checkpoint / "rng.safetensors")) == {"torch", "rank1.torch"}

    ids = torch.tensor([[5, 9, 17, 33, 2, 40]])
    ours = AutoModelForCausalLM.from_pretrained(model_folder)
    load_adapter(ours, fsdp)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_folder), fsdp)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_a_partial_factor_is_never_saved(model_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, add_adapter, save_adapter
    from lorakit.errors import AdapterError

    model = add_adapter(AutoModelForCausalLM.from_pretrained(model_folder), LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    layer.lora_B["default"] = torch.nn.Parameter(layer.lora_B["default"][: layer.out_features // 2])  # rank 0's half
    with pytest.raises(AdapterError, match="only part of the tensor"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("saved_on, resumed_on", [("ddp", 1), ("one", 2)])
def test_a_checkpoint_resumes_on_another_number_of_processes(saved_on, resumed_on, runs, model_folder, skill_files,
                                                             tmp_path):
    """Halfway checkpoints continued on the other process count keep the global batch and end where the
    uninterrupted run ends."""
    resumed = tmp_path / "resumed"
    shutil.copytree(runs[saved_on], resumed)
    (resumed / "checkpoints" / "latest.json").write_text(json.dumps({"step": HALF, "path": f"step-{HALF:06d}"}))
    args = settings(model_folder, skill_files, resumed, "--resume")
    if resumed_on == 1:
        command = [sys.executable, "-m", "lorakit", *args]
    else:
        command = [*TORCHRUN, "-m", "lorakit", *args, "--strategy", "fsdp"]
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"so that a step still takes 2 micro-batches" in result.stderr
    assert relative_difference(runs["one"], resumed) <= 1e-5
    assert losses(resumed) == pytest.approx(losses(runs["one"]), rel=1e-6)


def test_a_module_without_gradient_on_one_rank_stops_the_run_naming_it(model_folder):
    result = run([*TORCHRUN, __file__, "coverage", model_folder], timeout=240)
    assert result.returncode != 0
    assert "rank 1" in result.stderr and "model.layers.1.mlp.down_proj" in result.stderr


def test_a_failing_rank_stops_every_rank_with_its_message(model_folder, skill_files, tmp_path):
    """Two single-process "machines" of one job: the data is missing on the second; the first stops at once
    with the second's message, not when a collective times out (its own torchrun cannot see the other's)."""
    here, there = tmp_path / "node0", tmp_path / "node1"
    here.mkdir(), there.mkdir()
    shutil.copy(skill_files["train"], here / "train.jsonl")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = settings(model_folder, skill_files, tmp_path / "out", "--data", "train.jsonl")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "lorakit", *map(str, args)], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank, cwd in enumerate((here, there))]
    began = time.time()
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert time.time() - began < 200
    assert all(node.returncode != 0 for node in nodes)
    assert "lorakit train: error: rank 1:" in outputs[0][1] and "train.jsonl" in outputs[0][1]


def _coverage_worker(model_folder: str) -> None:
    """One DDP step on two processes in which rank 1's forward pass skips one adapted module."""
    from lorakit.data import BatchPlan, Row, tokenize_rows
    from lorakit.models import load_tokenizer
    from lorakit.train.config import TrainConfig
    from lorakit.train.distributed import Replicas
    from lorakit.train.loop import train_step
    from lorakit.train.setup import Runtime, build_model, build_optimizer

    runtime = Runtime.from_environment()
    with Replicas.join(runtime) as replicas:
        config = TrainConfig(model=model_folder, r=4, precision="fp32", max_steps=1)
        model = build_model(config, runtime, "fp32")
        if runtime.rank == 1:
            skipped = model.model.layers[1].mlp.down_proj
            skipped.forward = skipped.base_layer.forward
        replicas.wrap(model, "ddp")
        optimizer, scheduler = build_optimizer(config, model)
        tokenizer = load_tokenizer(model_folder)
        rows = [Row({"prompt": f"item {i}:", "completion": f" value {i}"}, f"memory:{i}") for i in range(4)]
        plan = BatchPlan(tokenize_rows(rows, tokenizer, 64)[0], batch_size=2, max_length=64,
                         pad_id=tokenizer.pad_token_id, seed=0, packing=False)
        batch = plan.collate(plan.epoch(0)[runtime.rank])
        train_step(model, optimizer, scheduler, [batch], precision="fp32", device=runtime.device, max_grad_norm=1.0,
                   parameters=[p for p in model.parameters() if p.requires_grad], replicas=replicas)


if __name__ == "__main__" and sys.argv[1:2] == ["coverage"]:
    _coverage_worker(sys.argv[2])
