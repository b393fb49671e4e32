"""`lorakit train` on two processes (torchrun, gloo on the CPU) against the one-process run.

A run on 2 processes with gradient accumulation k equals the 1-process run with 2k: the same global
batches, token-exact loss, summed gradients. The runs are real subprocesses on a tiny Llama folder; each
saves a checkpoint halfway, which the resume tests continue on the other number of processes.

Run as a script (`torchrun ... tests/test_train_distributed.py coverage MODEL`), this file is the worker of
the failure test: on rank 1 one adapted module is left out of the forward pass.
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


def test_a_rank_without_gradients_stops_every_machine_with_its_message(model_folder):
    """Two single-process "machines" of one job; on the second, one adapted module is left out of the forward
    pass. Its rank stops naming the module, and the first machine's rank, waiting in the gradient all-reduce,
    stops at once with that message (its own torchrun cannot see the other machine's process fail)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    machines = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                                  str(rank), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
                                  str(port), __file__, "coverage", str(model_folder)], env=ENV, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    began = time.time()
    outputs = [machine.communicate(timeout=240)[1] for machine in machines]
    assert time.time() - began < 200          # not gloo's 30-minute timeout
    assert all(machine.returncode != 0 for machine in machines)
    message = next(line for line in outputs[0].splitlines() if line.startswith("lorakit train: error: "))
    assert "rank 1:" in message and "no gradient" in message and "model.layers.1.mlp.down_proj" in message


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
