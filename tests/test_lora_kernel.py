"""The compiled CPU LoRA kernel against the batched-products reference and the adapter files' own math; the
precision the slots hold adapters in; the engine on either path."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.engine import Engine, EngineConfig, SamplingParams
from lorakit.engine.served_adapter import fit_to_layout
from lorakit.engine.layout import DecoderLayout, PROJECTION_GROUP
from lorakit.engine.lora_gathered import GatheredLora
from lorakit.engine.lora_kernel import SlotLora, cpu_kernel
from lorakit.engine.lora_slots import LoraSlots
from lorakit.models import load_tokenizer

needs_kernel = pytest.mark.skipif(cpu_kernel() is None, reason="the CPU LoRA kernel could not be built here")


def served(folder, layout, max_rank):
    """An adapter folder as the engine holds it."""
    return fit_to_layout(lorakit.Adapter.read(folder), layout, max_rank)


def odd_llama():
    """Widths that are not multiples of the kernel's 16 lanes, grouped-query attention (q 40, k and v 20 wide)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def save_adapter(model, folder, rank: int, seed: int, dtype=torch.float32, **config):
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    config.setdefault("target_modules", "all-linear")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=rank, lora_alpha=3 * rank, init_lora_weights=False, **config))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(dtype)
    lorakit.save_adapter(model, folder)
    return folder


@pytest.fixture(scope="module")
def model_and_adapters(tmp_path_factory):
    """Ranks 4, 12 (slots padded to 16) and 8 on q and v only; each saved in fp32 and in bf16."""
    root = tmp_path_factory.mktemp("kernel")
    model = odd_llama()
    specs = [(4, {}), (12, {}), (8, {"target_modules": ["q_proj", "v_proj"]})]
    folders = {name: [save_adapter(model, root / f"{name}-{i}", rank, seed=i, dtype=dtype, **config)
                       for i, (rank, config) in enumerate(specs)]
               for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    return model, folders


def filled_slots(model, folders, adapter_dtype="auto"):
    layout = DecoderLayout(model)
    slots = LoraSlots(layout, 4, torch.device("cpu"), torch.float32, adapter_dtype)
    adapters = [served(folder, layout, 64) for folder in folders]
    for slot, adapter in enumerate(adapters):
        slots.write(slot, adapter)
    return layout, slots, adapters


def update_from_files(adapter, layout, layer, group, x):
    """s·(x A^T) B^T of each projection of the group, straight from the adapter's tensors (fp64)."""
    widths = layout.shapes[group].out_features
    pieces = [torch.zeros(*x.shape[:-1], w, dtype=torch.float64) for w in widths]
    for (where, projection), (a, b, scale) in adapter.factors.items():
        g, part = PROJECTION_GROUP[projection]
        if where == layer and g == group:
            pieces[part] = scale * (x.double() @ a.double().t()) @ b.double().t()
    return torch.cat(pieces, -1)


@needs_kernel
@pytest.mark.parametrize("files", ["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_kernel_equals_batched_products_and_the_files_math(model_and_adapters, files, tokens):
    model, folders = model_and_adapters
    layout, slots, adapters = filled_slots(model, folders[files])
    assert slots.dtype == (torch.bfloat16 if files == "bf16" else torch.float32)
    row_slots = [0, -1, 2, 1, 0]  # mixed ranks, a row without an adapter, a slot used twice
    torch.manual_seed(1)
    kernel = SlotLora(slots, row_slots, rank=12)
    reference = GatheredLora.from_slots(slots, row_slots, rank=12)
    for layer in range(layout.num_layers):
        for group, shape in layout.shapes.items():
            x = torch.randn(len(row_slots), tokens, shape.in_features)
            y = torch.randn(len(row_slots), tokens, sum(shape.out_features))
            fast = kernel.apply(layer, group, x, y.clone())
            slow = reference.apply(layer, group, x, y.clone())
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
            for row, slot in enumerate(row_slots):
                expected = y[row].double() + (update_from_files(adapters[slot], layout, layer, group, x[row])
                                              if slot >= 0 else 0)
                torch.testing.assert_close(fast[row].double(), expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(fast[1], y[1])  # no adapter: untouched


@needs_kernel
def test_kernel_takes_bf16_activations(model_and_adapters):
    model, folders = model_and_adapters
    _, slots, _ = filled_slots(model, folders["bf16"])
    x, y = torch.randn(3, 2, 40).bfloat16(), torch.randn(3, 2, 80).bfloat16()
    fast = SlotLora(slots, [2, 0, -1], 12).apply(1, "qkv", x, y.clone())
    slow = GatheredLora.from_slots(slots, [2, 0, -1], 12).apply(1, "qkv", x, y.clone())
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), slow.float(), rtol=2e-2, atol=2e-2)


@needs_kernel
def test_a_rows_result_does_not_depend_on_its_batch(model_and_adapters):
    model, folders = model_and_adapters
    layout, slots, _ = filled_slots(model, folders["fp32"])
    x, y = torch.randn(4, 1, 40), torch.randn(4, 1, 80)
    together = SlotLora(slots, [1, 0, 2, 1], 12).apply(0, "qkv", x, y.clone())
    for row, slot in enumerate([1, 0, 2, 1]):
        alone = SlotLora(slots, [slot], 12).apply(0, "qkv", x[row:row + 1], y[row:row + 1].clone())
        assert torch.equal(alone[0], together[row])


def test_slots_hold_bf16_adapters_in_bf16_and_switch_to_fp32_without_changing_them(model_and_adapters):
    model, folders = model_and_adapters
    layout = DecoderLayout(model)
    slots = LoraSlots(layout, 3, torch.device("cpu"), torch.float32)
    bf16_adapter = served(folders["bf16"][1], layout, 64)
    slots.write(0, bf16_adapter)
    assert slots.dtype == torch.bfloat16 and bf16_adapter.fits(torch.bfloat16)
    x, y = torch.randn(1, 2, 40), torch.randn(1, 2, 80)
    before = slots.batch([0]).apply(1, "qkv", x, y.clone())
    fp32_adapter = served(folders["fp32"][0], layout, 64)
    assert not fp32_adapter.fits(torch.bfloat16)
    slots.write(1, fp32_adapter)  # an adapter that bf16 would round: every slot becomes fp32
    assert slots.dtype == torch.float32
    assert torch.equal(slots.batch([0]).apply(1, "qkv", x, y.clone()), before)


def test_slots_hold_fp16_adapters_in_fp16_and_narrow_again_when_fp32_leaves(model_and_adapters, tmp_path):
    model, folders = model_and_adapters
    layout = DecoderLayout(model)
    fp16 = served(save_adapter(model, tmp_path / "fp16", 8, seed=7, dtype=torch.float16), layout, 64)
    assert fp16.fits(torch.float16) and not fp16.fits(torch.bfloat16)
    slots = LoraSlots(layout, 2, torch.device("cpu"), torch.float32)
    slots.write(0, fp16)
    assert slots.dtype == torch.float16
    x, y = torch.randn(2, 1, 40), torch.randn(2, 1, 80)
    before = slots.batch([0, 0]).apply(0, "qkv", x, y.clone())
    slots.write(1, served(folders["fp32"][0], layout, 64))  # an fp32 adapter: only fp32 holds both
    assert slots.dtype == torch.float32
    assert torch.equal(slots.batch([0, 0]).apply(0, "qkv", x, y.clone()), before)
    slots.write(1, served(tmp_path / "fp16", layout, 64))  # the fp32 one replaced: fp16 holds both again
    assert slots.dtype == torch.float16
    assert torch.equal(slots.batch([0, 0]).apply(0, "qkv", x, y.clone()), before)


@pytest.mark.parametrize("adapter_dtype, files, held", [("fp32", "bf16", torch.float32),
                                                        ("bf16", "fp32", torch.bfloat16)])
def test_adapter_dtype_forces_the_slots_precision(model_and_adapters, adapter_dtype, files, held):
    model, folders = model_and_adapters
    _, slots, _ = filled_slots(model, folders[files], adapter_dtype)
    assert slots.dtype == held


def test_engine_gives_the_same_tokens_on_the_kernel_and_the_reference_path(model_and_adapters):
    model, folders = model_and_adapters
    tokenizer = load_tokenizer(None)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompts = [[5, 17, 230, 9], [40, 41], [7] * 9, [300, 12, 12]]
    results = {}
    for path in ("kernel", "reference"):
        engine = Engine(EngineConfig(max_running=4, max_loaded_adapters=3), model=copy.deepcopy(model),
                        tokenizer=tokenizer)
        if path == "reference":
            engine.slots.kernel = None
        for i, folder in enumerate(folders["fp32"]):
            engine.add_adapter(f"a{i}", folder)
        handles = [engine.submit(ids, params, adapter) for ids, adapter in zip(prompts, ["a0", None, "a1", "a2"])]
        engine.run_until_idle()
        results[path] = [h.result().token_ids for h in handles]
    assert results["kernel"] == results["reference"]


def test_without_the_kernel_the_engine_uses_batched_products(tmp_path):
    script = ("from lorakit.engine import Engine, EngineConfig\n"
              "print(Engine(EngineConfig(max_running=2, max_model_len=64)).slots.path)\n")
    env = dict(os.environ, LORAKIT_CPU_KERNEL="0")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "batched-products"
    if cpu_kernel() is not None:
        assert Engine(EngineConfig(max_running=2, max_model_len=64)).slots.path == "cpu-kernel"
