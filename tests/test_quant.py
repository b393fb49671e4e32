"""A quantized frozen base: NF4 / int8 weights, both backends, LoRA training on top, merging and serving."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import lorakit
from lorakit.engine import Engine, EngineConfig, SamplingParams
from lorakit.errors import AdapterError, ConfigError, TrainError
from lorakit.models import load_model, load_tokenizer
from lorakit.quant import QuantizedLinear, dequantize_model, quantize_model, resolve_backend
from lorakit.quant import bitsandbytes_backend
from lorakit.quant.codes import NF4_LEVELS
from lorakit.quant.int8 import quantize_int8
from lorakit.quant.linear import dequantize, quantize
from lorakit.quant.nf4 import quantize_nf4
from lorakit.train.config import TrainConfig

BNB = bitsandbytes_backend.unavailable_reason("cpu") is None
needs_bnb = pytest.mark.skipif(not BNB, reason="bitsandbytes does not run on this machine")
SHAPES = [((256, 256), torch.bfloat16), ((672, 256), torch.float32), ((96, 130), torch.float32), ((3, 7), torch.float16)]


@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_nf4_stores_the_nearest_level_of_each_block_and_4_127_bits_a_weight(shape, dtype):
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=dtype) * 0.05
    q = quantize_nf4(weight)
    flat = weight.float().reshape(-1)
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % 64)).view(-1, 64)
    true_max = blocks.abs().max(1).values
    levels = torch.tensor(NF4_LEVELS)
    nearest = ((blocks / true_max[:, None]).reshape(-1)[:n, None] - levels).abs().argmin(1)
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], 1).reshape(-1)[:n].long()
    assert torch.equal(codes, nearest)
    scales = q.block_absmax()  # the block maxima after double quantization: within 1% of the largest
    assert (scales - true_max).abs().max() <= 0.01 * true_max.max()
    expected = (levels[codes] * scales.repeat_interleave(64)[:n]).to(dtype).view(shape)
    assert torch.equal(q.dequantize(), expected)
    big = quantize_nf4(torch.randn(1024, 1024))
    assert big.num_bytes * 8 / 1024 ** 2 == pytest.approx(4.127, abs=0.005)


def test_int8_keeps_each_row_to_its_own_scale():
    torch.manual_seed(0)
    weight = torch.randn(64, 128) * torch.logspace(-3, 0, 64).unsqueeze(1)  # rows of very different size
    q = quantize_int8(weight)
    error = (q.dequantize() - weight).abs().max(1).values
    assert (error <= weight.abs().max(1).values / 127 * 0.51).all()
    assert q.num_bytes == 64 * 128 + 64 * 4


@needs_bnb
@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_bitsandbytes_and_torch_give_the_same_dequantized_weights(method, shape, dtype):
    if method == "int8" and dtype is torch.float16:
        pytest.skip("int8 is row-wise on 2-D fp32/bf16 weights here")
    torch.manual_seed(1)
    weight = torch.randn(shape, dtype=dtype) * 0.05
    by_bnb, by_torch = quantize(weight, method, "bitsandbytes"), quantize(weight, method, "torch")
    assert torch.equal(dequantize(by_bnb, dtype, "torch"), dequantize(by_torch, dtype, "torch"))
    if method == "nf4":
        import bitsandbytes.functional as bnb_functional
        packed, _ = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        assert torch.equal(packed.view(-1), by_torch.packed)  # the 4-bit codes are bitsandbytes' own
    layer = QuantizedLinear(torch.nn.Linear(shape[1], shape[0], dtype=dtype), method, "bitsandbytes")
    assert torch.equal(layer.dequantized(), layer.quantized.dequantize(dtype))  # whichever path it kept


@needs_bnb
def test_a_weight_bitsandbytes_mis_dequantizes_falls_back_to_the_torch_path():
    """bitsandbytes 0.50's CPU kernel gets bf16 rows of 96/160/672 values wrong; the layer notices and avoids it."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(672, 256, dtype=torch.bfloat16)
    layer = QuantizedLinear(linear, "nf4", "bitsandbytes")
    assert torch.equal(layer.dequantized(), layer.quantized.dequantize(torch.bfloat16))


def test_a_quantized_layer_computes_with_its_dequantized_weight_forward_and_backward():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = QuantizedLinear(linear, "nf4", "torch")
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.dequantized(), linear.bias))
    y.sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized().sum(0).expand(5, 64))
    assert not any(p.requires_grad for p in layer.parameters())


def test_quantize_model_reports_the_savings_and_lora_trains_on_top():
    model = load_model(None, dtype=torch.bfloat16)
    report = quantize_model(model, "nf4", "torch")
    assert report.layers == 42 and report.layer_ratio < 0.30  # 6 layers x 7 projections; the head stays
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 42
    assert not isinstance(model.lm_head, QuantizedLinear)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 4096, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    with pytest.raises(AdapterError, match="quantized"):
        lorakit.merge_adapter(model, "default")


def test_bad_quantization_settings_say_what_to_do_instead():
    with pytest.raises(ConfigError, match="nf4, int8"):
        quantize_model(load_model(None), "fp4")
    with pytest.raises(ConfigError, match="auto, torch or bitsandbytes"):
        resolve_backend("gpu", torch.device("cpu"))
    if not torch.cuda.is_available():  # a device this build of PyTorch (hence bitsandbytes) cannot use
        with pytest.raises(ConfigError, match="use the torch backend"):
            resolve_backend("bitsandbytes", torch.device("cuda"))
        assert resolve_backend("auto", torch.device("cuda")) == "torch"
    with pytest.raises(TrainError, match="quantize must be one of nf4, int8"):
        TrainConfig(quantize="int4")
    with pytest.raises(TrainError, match="DoRA"):
        TrainConfig(quantize="nf4", use_dora=True)


def test_lorakit_train_quantize_nf4_writes_the_savings_and_a_working_adapter(tmp_path):
    output = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "--quantize", "nf4", "--max-steps", "10",
                          "--eval-steps", "10", "--eval-samples", "8", "--output", str(output), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads((output / "train_report.json").read_text())
    assert report["quantization"]["method"] == "nf4" and report["quantization"]["layer_ratio"] < 0.30
    assert report["peak_memory_mb"] > 0 and report["eval_after"]["loss"] < report["eval_before"]["loss"]
    # the adapter merges into the dequantized base with the outputs it had on the quantized one
    merged = subprocess.run([sys.executable, "-m", "lorakit.cli", "merge", "--quantize", "nf4", "--requantize", "nf4",
                             "--adapter", str(output), "--output", str(tmp_path / "merged")],
                            capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr
    difference = float(merged.stdout.split("(fp32): ")[1].split()[0])
    assert difference < 1e-4 and "requantized to nf4" in merged.stdout
    # and the serving engine on the same quantized base gives transformers' tokens
    tokenizer = load_tokenizer(None)
    engine = Engine(EngineConfig(quantize="nf4", dtype="fp32", max_model_len=128))
    engine.add_adapter("q", str(output))
    ids = tokenizer("Reverse the words: king night sword\nAnswer:")["input_ids"]
    handle = engine.submit(ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), "q")
    engine.run_until_idle()
    model = load_model(None)
    quantize_model(model, "nf4")
    lorakit.load_adapter(model, str(output))
    tokens, x = [], torch.tensor([ids])
    with torch.no_grad():
        for _ in range(6):
            tokens.append(int(model(input_ids=x).logits[0, -1].argmax()))
            x = torch.cat([x, torch.tensor([[tokens[-1]]])], 1)
    assert handle.result().token_ids == tokens


def test_dequantize_model_gives_back_plain_linear_layers():
    model = load_model(None)
    quantize_model(model, "int8", "torch")
    weights = {n: m.dequantized(torch.float32) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    dequantize_model(model, torch.float32)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    for name, weight in weights.items():
        assert torch.equal(model.get_submodule(name).weight, weight)


def test_generation_holds_the_weights_dequantized_only_within_budget():
    from lorakit.quant.linear import dequantized_while_inferring

    model = load_model(None)
    quantize_model(model, "nf4", "torch")
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    with dequantized_while_inferring(model, budget_bytes=1) as held:
        assert not held and all(m.cached is None for m in layers)
    with dequantized_while_inferring(model, budget_bytes=2**30) as held:
        assert held and all(torch.equal(m.cached, m.quantized.dequantize(torch.float32)) for m in layers)
    assert all(m.cached is None for m in layers)


@pytest.mark.parametrize("method,limit", [("nf4", 0.30), ("int8", 0.55)])
def test_quantized_embeddings_bring_the_whole_model_down_and_a_tied_head_shares_them(method, limit, tmp_path):
    from lorakit.quant.embedding import QuantizedEmbedding

    model = load_model(None)
    reference = copy.deepcopy(model)
    report = quantize_model(model, method, "torch", embeddings=True)
    assert report.model_ratio <= limit and report.layer_ratio <= limit
    table = model.get_input_embeddings()
    assert isinstance(table, QuantizedEmbedding) and model.lm_head.quantized is table.quantized  # tied: one copy
    ids = torch.randint(0, 4096, (2, 9))
    assert torch.equal(table(ids), torch.nn.functional.embedding(ids, table.weight))
    folder = save_adapter_for(reference, tmp_path / "a")
    lorakit.load_adapter(model, folder)
    with torch.no_grad():
        quantized_logits = model(input_ids=ids).logits
        dequantize_model(model, torch.float32)
        assert model.lm_head.weight is model.get_input_embeddings().weight  # tied again
        torch.testing.assert_close(model(input_ids=ids).logits, quantized_logits, rtol=1e-5, atol=1e-5)
    engine = Engine(EngineConfig(quantize=method, quantize_embeddings=True, dtype="fp32", max_model_len=64))
    engine.add_adapter("a", folder)
    handle = engine.submit(ids[0].tolist(), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), "a")
    engine.run_until_idle()
    tokens, x = [], ids[:1]
    with torch.no_grad():
        for _ in range(5):
            tokens.append(int(model(input_ids=x).logits[0, -1].argmax()))
            x = torch.cat([x, torch.tensor([[tokens[-1]]])], 1)
    assert handle.result().token_ids == tokens


def save_adapter_for(model, folder):
    model = copy.deepcopy(model)
    torch.manual_seed(3)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    lorakit.save_adapter(model, folder)
    return str(folder)
