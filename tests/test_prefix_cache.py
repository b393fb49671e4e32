"""The engine's prefix cache and activated LoRA (aLoRA) serving: blocks hashed by what made them and evicted
least recently used, later turns token-identical to no cache, tenants kept apart, and aLoRA rows that
equal lorakit + transformers' generation, run the base before their invocation and share a batch."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.engine import Engine, EngineConfig, SamplingParams
from lorakit.engine.kv_cache import KVCache
from lorakit.engine.prefix_cache import PrefixCache
from lorakit.errors import RequestError
from tiny_models import chat_llama, tiny_chat_tokenizer

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
BLOCK = 4


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return chat_llama(tokenizer)


def save_adapter(model, folder, seed: int, **config) -> str:
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules="all-linear", **config))
    lorakit.save_adapter(model, folder)
    return str(folder)


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    return {"lora": save_adapter(model, root / "lora", 1),
            "alora": save_adapter(model, root / "alora", 2, alora_invocation_tokens=INVOCATION)}


INVOCATION = [7, 8, 9]


def engine_for(model, tokenizer, adapters, **config) -> Engine:
    engine = Engine(EngineConfig(dtype="fp32", kv_block_size=BLOCK, **config), model=copy.deepcopy(model),
                    tokenizer=tokenizer)
    for name, folder in adapters.items():
        engine.add_adapter(name, folder)
    return engine


def run(engine, requests, params=GREEDY, tenant=None) -> list[list[int]]:
    handles = [engine.submit(ids, params, adapter, tenant=tenant) for ids, adapter in requests]
    engine.run_until_idle()
    return [h.result().token_ids for h in handles]


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(20, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(model, adapter, ids, steps) -> list[int]:
    """lorakit.load_adapter + transformers' greedy generation (its KV cache: aLoRA offsets as PEFT's)."""
    model = copy.deepcopy(model)
    if adapter is not None:
        lorakit.load_adapter(model, adapter)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


# --- the block store -------------------------------------------------------------------------------------
def test_block_hashes_cover_tokens_producer_and_tenant_and_lru_evicts_within_the_budget(model, tokenizer, adapters):
    engine = engine_for(model, tokenizer, adapters)
    cache = engine.prefix
    ids = prompt(0, 13)
    handle = engine.submit(ids, GREEDY)
    seq = engine._inbox[0]
    first = cache.hashes(seq, 3)
    assert len(set(first)) == 3
    later = engine.submit(ids[:8] + [5] + ids[9:], GREEDY)  # block 2 differs: blocks 0-1 equal, 2 on differ
    assert cache.hashes(engine._inbox[1], 3)[:2] == first[:2] and cache.hashes(engine._inbox[1], 3)[2] != first[2]
    for adapter, tenant in (("lora", None), (None, "other")):
        engine.submit(ids, GREEDY, adapter, tenant=tenant)
        assert set(cache.hashes(engine._inbox[-1], 3)).isdisjoint(first)
    engine.run_until_idle()
    assert handle.result().token_ids and later.result().token_ids
    assert cache.stats.cached_blocks == len(cache.blocks) > 0

    kv = KVCache(2, 2, 8, BLOCK, torch.device("cpu"), torch.float32, budget=4 * engine.kv.block_bytes, max_len=64,
                 max_running=4)
    small = PrefixCache(kv)
    running = []
    kv.extend(running, BLOCK)  # a running sequence holds one of the four blocks; the cache keeps to the other three

    def compute(seq):  # a one-block prompt prefilled and finished: its block registered, then let go
        kv.extend(seq.block_table, BLOCK)
        small.register(seq, BLOCK)
        kv.release(seq.block_table)

    seqs = []
    for i in range(4):
        engine.submit(prompt(10 + i, BLOCK + 1), GREEDY)
        seqs.append(engine._take_inbox()[0])
        compute(seqs[-1])
    assert small.stats.cached_blocks == 3 and small.stats.evicted_blocks == 1 and kv.free_blocks == 3
    small.lookup(seqs[1])  # the oldest left is used: the next eviction takes the one after it
    assert seqs[1].cached == BLOCK and kv.refs[seqs[1].block_table[0]] == 1 and kv.free_blocks == 2
    kv.release(seqs[1].block_table)
    engine.submit(prompt(20, BLOCK + 1), GREEDY)
    compute(engine._take_inbox()[0])
    small.lookup(seqs[2])
    small.lookup(seqs[1])
    assert seqs[2].cached == 0 and seqs[1].cached == BLOCK


def test_the_kv_pool_is_sized_by_its_budget_and_blocks_are_taken_as_sequences_grow(model, tokenizer, adapters):
    engine = engine_for(model, tokenizer, adapters, max_running=16, kv_cache_memory=40 * 2 * 2 * 2 * BLOCK * 8 * 4)
    kv = engine.kv
    assert kv.num_blocks == 40 and kv.used_blocks == 0  # not max_running x max_model_len
    handles = [engine.submit(prompt(1 + i, 10), GREEDY) for i in range(3)]
    engine.scheduler.waiting.extend(engine._take_inbox())
    engine.scheduler.step()  # prefill and the first decode step: 11 positions of 3 sequences, in 3 blocks each
    assert kv.used_blocks == 9 and all(len(s.block_table) == 3 for s in engine.scheduler.running)
    engine.run_until_idle()
    assert all(h.result().token_ids for h in handles)
    assert kv.used_blocks == 0  # the blocks are let go; the prefix cache keeps the full ones
    assert engine.prefix.stats.cached_blocks == 3 * ((10 + GREEDY.max_tokens - 1) // BLOCK)
    with pytest.raises(Exception, match="kv_cache_memory"):
        engine_for(model, tokenizer, {}, kv_cache_memory=1000)


def test_requests_with_one_beginning_share_its_blocks_in_place_while_they_run(model, tokenizer, adapters):
    engine = engine_for(model, tokenizer, adapters)
    history = prompt(15, 18)
    run(engine, [(history, None)])
    handles = [engine.submit(history + prompt(16 + i, 3), GREEDY) for i in range(3)]
    engine.scheduler.waiting.extend(engine._take_inbox())
    engine.scheduler.step()
    tables = [s.block_table for s in engine.scheduler.running]
    assert len(tables) == 3 and tables[0][:4] == tables[1][:4] == tables[2][:4]  # 16 cached positions, 4 blocks
    assert all(engine.kv.refs[block] == 3 for block in tables[0][:4])
    assert len({t[4] for t in tables}) == 3  # each writes its own blocks past the shared ones
    engine.run_until_idle()
    plain = engine_for(model, tokenizer, adapters, prefix_cache=False)
    assert [h.result().token_ids for h in handles] == run(plain, [(history + prompt(16 + i, 3), None)
                                                                   for i in range(3)])


def test_a_full_pool_evicts_idle_blocks_and_makes_requests_wait_never_fail(model, tokenizer, adapters):
    block_bytes = 2 * 2 * 2 * BLOCK * 8 * 4  # keys and values of 2 layers, 2 kv heads, BLOCK positions, dim 8, fp32
    engine = engine_for(model, tokenizer, adapters, kv_cache_memory=12 * block_bytes, max_model_len=32)
    requests = [(prompt(30 + i, 20), None) for i in range(8)]  # 20 + 6 positions: 7 blocks each, 12 in the pool
    plain = engine_for(model, tokenizer, adapters, prefix_cache=False)
    assert run(engine, requests) == run(plain, requests)
    assert engine.prefix.stats.evicted_blocks > 0 and engine.kv.used_blocks == 0


# --- reuse ---------------------------------------------------------------------------------------------------
def test_a_second_turn_reuses_the_first_and_gives_the_tokens_of_no_cache(model, tokenizer, adapters):
    cached, plain = (engine_for(model, tokenizer, adapters, prefix_cache=on) for on in (True, False))
    history = prompt(2, 21)
    for adapter in (None, "lora"):
        first = run(cached, [(history, adapter)])[0]
        assert first == run(plain, [(history, adapter)])[0]
        turn = history + first + prompt(3, 5)
        before = cached.prefix.stats.hit_tokens
        assert run(cached, [(turn, adapter)]) == run(plain, [(turn, adapter)])
        # the whole first turn but its last generated token (never fed back) is in whole blocks
        assert cached.prefix.stats.hit_tokens - before == (len(history) + len(first) - 1) // BLOCK * BLOCK
    assert plain.prefix.stats.hit_tokens == 0 and cached.prefix.stats.hit_rate > 0


def test_tenants_share_no_blocks_unless_the_operator_opts_in(model, tokenizer, adapters):
    ids = prompt(4, 17)
    for shared in (False, True):
        engine = engine_for(model, tokenizer, adapters, share_prefix_cache_across_tenants=shared)
        alice = run(engine, [(ids, None)], tenant="alice")
        assert engine.prefix.stats.hit_tokens == 0
        assert run(engine, [(ids, None)], tenant="bob") == alice
        assert engine.prefix.stats.hit_tokens == (16 if shared else 0)
        run(engine, [(ids, None)], tenant="alice")
        assert engine.prefix.stats.hit_tokens == (32 if shared else 16)


# --- aLoRA ---------------------------------------------------------------------------------------------------
def test_alora_tokens_equal_lorakit_and_transformers_generation_with_and_without_the_cache(model, tokenizer, adapters):
    ids = prompt(5, 14) + INVOCATION + prompt(6, 4)
    expected = reference(model, adapters["alora"], ids, GREEDY.max_tokens)
    assert expected != reference(model, None, ids, GREEDY.max_tokens)  # the adapter changes the output
    for on in (False, True):
        engine = engine_for(model, tokenizer, adapters, prefix_cache=on)
        assert run(engine, [(ids, "alora")]) == [expected]


@pytest.mark.parametrize("path", ["kernel", "batched-products"])
def test_an_alora_turn_reuses_base_blocks_before_its_invocation_and_does_no_lora_work_there(model, tokenizer, adapters,
                                                                                            path, monkeypatch):
    from lorakit.engine.lora_kernel import cpu_kernel

    if path == "kernel" and cpu_kernel() is None:
        pytest.skip("the CPU kernels could not be built here")
    if path == "batched-products":
        monkeypatch.setenv("LORAKIT_CPU_KERNEL", "0")
        cpu_kernel.cache_clear()
    try:
        engine = engine_for(model, tokenizer, adapters)
    finally:
        cpu_kernel.cache_clear()
    assert engine.slots.path == ("cpu-kernel" if path == "kernel" else "batched-products")
    history = prompt(7, 18)
    run(engine, [(history, None)])  # a base turn
    calls = []
    forward = engine.runner.forward

    def recording(tokens, positions, tables, last, lora=None, weights=None, valid=None):
        worked = positions[valid] if valid is not None else positions.flatten()  # positions with LoRA work:
        if lora is not None and getattr(lora, "active", None) is not None:  # the kernel skips tokens left out
            worked = positions[lora.active & (valid if valid is not None else True)]
        elif lora is None and weights is None:
            worked = positions[:0]
        calls.append((positions[valid].tolist() if valid is not None else positions.flatten().tolist(),
                      worked.tolist()))
        return forward(tokens, positions, tables, last, lora, weights, valid)

    engine.runner.forward = recording
    ids = history + prompt(8, 3) + INVOCATION + prompt(9, 2)
    start = len(history) + 3
    assert run(engine, [(ids, "alora")]) == [reference(model, adapters["alora"], ids, GREEDY.max_tokens)]
    prefill = calls[:1] if path == "kernel" else calls[:2]
    computed = [p for positions, _ in prefill for p in positions]
    adapted = [p for _, worked in prefill for p in worked]
    assert computed == list(range(16, len(ids)))  # after the 16 cached positions, once each
    assert adapted == list(range(start, len(ids)))  # the LoRA only from the invocation on
    assert engine.prefix.stats.hit_tokens == 16


def test_base_lora_and_alora_rows_share_a_batch_and_each_gets_its_own_tokens(model, tokenizer, adapters):
    engine = engine_for(model, tokenizer, adapters)
    shared = prompt(10, 9)
    requests = [(shared + prompt(11, 3), None), (shared + INVOCATION + prompt(12, 1), "alora"),
                (prompt(13, 7), "lora"), (shared + prompt(14, 2) + INVOCATION, "alora")]
    together = run(engine, requests)
    assert together == [reference(model, adapters[a] if a else None, ids, GREEDY.max_tokens) for ids, a in requests]


def test_an_alora_prompt_without_its_invocation_is_refused_naming_it(model, tokenizer, adapters):
    engine = engine_for(model, tokenizer, adapters)
    with pytest.raises(RequestError, match=r"\[7, 8, 9\]"):
        engine.submit(prompt(15, 6), GREEDY, "alora")
    with pytest.raises(RequestError, match="mixture"):
        engine.submit(prompt(15, 6) + INVOCATION, GREEDY, {"alora": 0.5, "lora": 0.5})


# --- the server ------------------------------------------------------------------------------------------
def test_serve_refuses_an_alora_prompt_without_its_invocation_appends_it_on_request_and_reports_the_cache(tmp_path):
    import openai
    from test_serve import BASE, start_server

    from lorakit.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(None)
    invocation = tokenizer.encode(" Verdict:")
    folder = save_adapter(load_model(None), tmp_path / "judge", 3, alora_invocation_tokens=invocation)
    server = start_server(tmp_path, "--adapter", f"judge={folder}", "--max-running", "4")
    try:
        client = server.client()
        with pytest.raises(openai.BadRequestError, match=str(invocation).replace("[", r"\[").replace("]", r"\]")):
            client.completions.create(model="judge", prompt="The play is long.", max_tokens=4, temperature=0)
        history = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
        appended = client.completions.create(model="judge", prompt=history, max_tokens=4, temperature=0,
                                             extra_body={"alora_append_invocation": True})
        written = client.completions.create(model="judge", prompt=history + " Verdict:", max_tokens=4, temperature=0)
        assert appended.choices[0].text == written.choices[0].text
        assert appended.usage.prompt_tokens == written.usage.prompt_tokens
        client.completions.create(model=BASE, prompt=history, max_tokens=4, temperature=0)
        assert server.wait_metric("lorakit_prefix_cache_hit_rate") > 0 and server.wait_metric("lorakit_prefix_cache_blocks") > 0
    finally:
        server.stop()
    assert "Traceback" not in server.stderr.read_text()


def test_a_peft_trained_alora_served_over_http_gives_pefts_greedy_tokens(tmp_path):
    peft = pytest.importorskip("peft")
    from test_serve import start_server

    from lorakit.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(None)
    invocation = tokenizer.encode(" Verdict:")
    torch.manual_seed(5)
    theirs = peft.get_peft_model(load_model(None), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], alora_invocation_tokens=invocation,
        task_type="CAUSAL_LM", init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "judge")
    prompts = [tokenizer.encode(text) + invocation for text in
               ("To be, or not to be, that is the question:", "My lord, the king is coming to the castle.")]
    prompts.append(tokenizer.encode("Friends, Romans") + invocation + tokenizer.encode(" the"))
    expected = []
    with torch.no_grad():
        for ids in prompts:
            out = theirs.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
            expected.append(tokenizer.decode(out[0, len(ids):]))
    server = start_server(tmp_path, "--adapter", f"judge={tmp_path / 'judge'}")
    try:
        client = server.client()
        for ids, want in zip(prompts, expected):
            got = client.completions.create(model="judge", prompt=ids, max_tokens=8, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert got.choices[0].text == want
    finally:
        server.stop()
