"""The CUDA paths: the engine's batched multi-adapter decoding (gathered batched products), bf16 serving,
bitsandbytes NF4 and a training run, each against the CPU/fp32 reference. Marked `cuda`: they run where a
GPU is (`scripts/gpu_check.sh` runs them first) and are skipped elsewhere."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from lorakit.engine import Engine, EngineConfig
from lorakit.models import load_model
from test_engine import GREEDY, PROMPTS, reference_tokens, run_all, save_adapter, tokenizer  # noqa: F401  (fixture)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    model = load_model(None)
    root = tmp_path_factory.mktemp("cuda")
    return model, {f"r{rank}": save_adapter(model, root / f"r{rank}", rank, seed=rank) for rank in (4, 16)}


def engine_on(device: str, dtype: str, model, folders, tokenizer) -> Engine:
    engine = Engine(EngineConfig(dtype=dtype, device=device, max_model_len=128), model=copy.deepcopy(model),
                    tokenizer=tokenizer)
    for name, folder in folders.items():
        engine.add_adapter(name, folder)
    return engine


def test_a_mixed_batch_on_cuda_gives_the_cpu_tokens_in_fp32(adapters, tokenizer):
    model, folders = adapters
    requests = [(tokenizer(p)["input_ids"], a) for p in PROMPTS for a in [None, *folders]]
    on_gpu = run_all(engine_on("cuda", "fp32", model, folders, tokenizer), requests)
    for (ids, adapter), result in zip(requests, on_gpu):
        assert result.token_ids == reference_tokens(model, folders.get(adapter), ids, GREEDY.max_tokens), adapter


def test_bf16_serving_on_cuda_stays_close_to_fp32(adapters, tokenizer):
    model, folders = adapters
    requests = [(tokenizer(p)["input_ids"], a) for p in PROMPTS for a in [None, *folders]]
    exact = run_all(engine_on("cuda", "fp32", model, folders, tokenizer), requests)
    half = run_all(engine_on("cuda", "bf16", model, folders, tokenizer), requests)
    first_tokens_agree = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(exact, half)) / len(exact)
    assert first_tokens_agree >= 0.9


def test_bitsandbytes_nf4_on_cuda_dequantizes_to_the_torch_paths_weights():
    from lorakit.quant import quantize_model

    model = load_model(None)
    ours, theirs = copy.deepcopy(model).cuda(), copy.deepcopy(model).cuda()
    quantize_model(ours, "nf4", "torch")
    quantize_model(theirs, "nf4", "bitsandbytes")
    ids = torch.tensor([[5, 6, 7, 8, 9]], device="cuda")
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-3, rtol=1e-3)


def test_lorakit_train_runs_on_cuda_in_bf16(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "--max-steps", "5", "--eval-steps", "5",
                           "--eval-samples", "4", "--precision", "bf16", "--no-progress", "--report-to", "none",
                           "--output", str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
