"""Paged attention: the compiled decode kernel reads each row's keys and values in the blocks its table names
and agrees with the reference (blocks gathered, then scaled_dot_product_attention); the engine gives the
same greedy tokens on either, for base, LoRA and mixed batches."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.engine import Engine, EngineConfig, SamplingParams
from lorakit.engine.kv_cache import KVCache
from lorakit.engine.lora_kernel import cpu_kernel
from lorakit.engine.paged_attention import PagedAttention
from tiny_models import chat_llama, tiny_chat_tokenizer

needs_kernel = pytest.mark.skipif(cpu_kernel() is None, reason="the CPU kernels could not be built here")


def filled_pool(kv_heads: int, head_dim: int, block: int, blocks: int) -> KVCache:
    kv = KVCache(1, kv_heads, head_dim, block, torch.device("cpu"), torch.float32,
                 budget=blocks * 2 * kv_heads * head_dim * block * 4, max_len=blocks * block, max_running=8)
    generator = torch.Generator().manual_seed(0)
    kv.keys.copy_(torch.randn(kv.keys.shape, generator=generator))
    kv.values.copy_(torch.randn(kv.values.shape, generator=generator))
    return kv


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,head_dim,block", [(4, 4, 16, 4), (8, 2, 16, 4), (4, 4, 32, 16),
                                                           (8, 2, 64, 16), (2, 2, 24, 16)])
def test_the_decode_kernel_agrees_with_gathered_attention_over_shared_and_scattered_blocks(heads, kv_heads, head_dim,
                                                                                          block):
    """Every path of the kernel: blocks of 4 (scores key by key) and of 16 (a block's keys transposed once for
    several queries), head sizes with registers kept over a block (32, 64) and without (16, 24)."""
    kv = filled_pool(kv_heads, head_dim, block=block, blocks=40)
    kernel, reference = PagedAttention(kv, heads, 0.25), PagedAttention(kv, heads, 0.25, use_kernel=False)
    assert kernel.form == "kernel" and reference.form == "gather"
    lengths = [1, 4, 5, 17, 33] if block == 4 else [1, 9, 16, 70, 131]
    tables = [[3, 9, 1, 30, 7, 2, 11, 20, 5], [3, 9, 1, 30, 8, 6, 12, 21, 4],  # two rows share their first blocks
              [39, 0, 13, 14, 15, 16, 17, 18, 19], [22, 23, 24, 25, 26, 27, 28, 29, 31],
              [32, 33, 34, 35, 36, 37, 38, 10, 0]]
    tables = torch.tensor(tables)
    last = torch.tensor(lengths)[:, None] - 1
    # decode; a few or many new tokens after a cached beginning (padded rows repeat their first position)
    for queries in (1, 5, 16, 32):
        positions = torch.maximum(last - queries + 1 + torch.arange(queries), torch.zeros(1, dtype=torch.long))
        q = torch.randn(len(lengths), heads, queries, head_dim, generator=torch.Generator().manual_seed(queries))
        fast, slow = kernel(0, q, tables, positions), reference(0, q, tables, positions)
        assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5), (fast - slow).abs().max()
        alone = kernel(0, q[3:4], tables[3:4], positions[3:4])  # a row's result does not depend on its batch
        assert torch.equal(alone, fast[3:4])


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return chat_llama(tokenizer, hidden_size=64, num_attention_heads=8, max_position_embeddings=256)


@needs_kernel
def test_the_engine_gives_the_same_greedy_tokens_with_the_kernel_and_the_reference(model, tokenizer, tmp_path):
    adapted = copy.deepcopy(model)
    torch.manual_seed(3)
    lorakit.add_adapter(adapted, lorakit.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                    target_modules="all-linear"))
    lorakit.save_adapter(adapted, tmp_path / "a")
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(20, 300, (n,), generator=generator).tolist() for n in (5, 19, 40, 64)]
    outputs = []
    for kernel in (None, False):
        engine = Engine(EngineConfig(dtype="fp32", kv_block_size=8, attention_kernel=kernel), model=copy.deepcopy(model),
                        tokenizer=tokenizer)
        assert engine.runner.attention.form == ("kernel" if kernel is None else "gather")
        engine.add_adapter("a", str(tmp_path / "a"))
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        handles = [engine.submit(p, params, adapter) for p in prompts for adapter in (None, "a")]
        engine.run_until_idle()
        outputs.append([h.result().token_ids for h in handles])
    assert outputs[0] == outputs[1]
