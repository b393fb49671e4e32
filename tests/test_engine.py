"""The serving engine: every row of a mixed batch gets exactly what it would get alone and what transformers
plus the adapter gives; continuous batching, sampling, stop strings, the adapter cache and bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import lorakit
from lorakit.engine import Engine, EngineConfig, SamplingParams
from lorakit.engine.lora_gathered import equal_width_runs
from lorakit.engine.projection import FORMS, OWN_LAYOUT, Projection, form_available
from lorakit.errors import (AdapterError, AdapterFileError, EngineStoppedError, QueueFullError, RequestError,
                            UnknownModelError)
from lorakit.models import load_model, load_tokenizer

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = ["To be, or not to be", "My lord,", "What light through yonder window breaks? It is the east,", "O"]


def tiny(kind: str):
    """A small random decoder of each supported family, sized for the embedded tokenizer's 4096 ids."""
    torch.manual_seed(0)
    common = dict(vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    if kind == "llama-gqa":
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common)).eval()
    if kind == "qwen2":  # q/k/v biases
        return Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **common)).eval()
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(num_key_value_heads=1, sliding_window=None, **common)).eval()
    return load_model(None)


def save_adapter(model, folder, rank: int, seed: int, **config):
    """A random adapter (B != 0, so it changes the output) for `model`, saved in PEFT's format."""
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    config.setdefault("target_modules", "all-linear")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False, **config))
    lorakit.save_adapter(model, folder)
    return str(folder)


def reference_tokens(model, adapter, prompt_ids, steps: int) -> list[int]:
    """Greedy tokens from transformers' own forward pass, the adapter loaded with lorakit."""
    model = copy.deepcopy(model)
    if adapter is not None:
        lorakit.load_adapter(model, adapter)
    ids, out = torch.tensor([prompt_ids]), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return out


def run_all(engine, requests, params=GREEDY):
    handles = [engine.submit(ids, params, adapter) for ids, adapter in requests]
    engine.run_until_idle()
    return [h.result() for h in handles]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def embedded_setup(tmp_path_factory, tokenizer):
    """The embedded model with adapters of ranks 4, 8 and 16, and an fp32 engine serving them."""
    root = tmp_path_factory.mktemp("engine")
    model = load_model(None)
    folders = {f"r{rank}": save_adapter(model, root / f"r{rank}", rank, seed=rank) for rank in (4, 8, 16)}
    engine = Engine(EngineConfig(dtype="fp32", max_running=16, max_model_len=256), model=copy.deepcopy(model),
                    tokenizer=tokenizer)
    for name, folder in folders.items():
        engine.add_adapter(name, folder)
    return model, folders, engine


@pytest.mark.parametrize("kind", ["embedded", "llama-gqa", "qwen2", "mistral"])
def test_a_mixed_batch_gives_every_row_what_it_gets_alone_and_what_transformers_gives(kind, tmp_path, tokenizer):
    model = tiny(kind)
    folders = {f"a{rank}": save_adapter(model, tmp_path / f"a{rank}", rank, seed=rank) for rank in (4, 16)}
    if kind == "qwen2":  # an adapter on some projections only, with a per-module rank
        folders["qv"] = save_adapter(model, tmp_path / "qv", 8, seed=3, target_modules=["q_proj", "v_proj"],
                                     rank_pattern={"v_proj": 2})
    engine = Engine(EngineConfig(dtype="fp32", max_model_len=128), model=copy.deepcopy(model), tokenizer=tokenizer)
    for name, folder in folders.items():
        engine.add_adapter(name, folder)
    requests = [(tokenizer(p)["input_ids"], a) for p in PROMPTS for a in [None, *folders]]
    batch = run_all(engine, requests)
    for (ids, adapter), result in zip(requests, batch):
        alone = run_all(engine, [(ids, adapter)])[0]
        assert result.token_ids == alone.token_ids, (adapter, ids)
        assert result.token_ids == reference_tokens(model, folders.get(adapter), ids, GREEDY.max_tokens), adapter
    assert len({tuple(r.token_ids) for r in batch[:len(folders) + 1]}) == len(folders) + 1  # adapters matter


def test_sequences_join_and_leave_between_decode_steps(embedded_setup, tokenizer):
    """Continuous batching: requests arrive while others decode and finish at different steps."""
    model, folders, engine = embedded_setup
    plan = [(PROMPTS[0], "r8", 20), (PROMPTS[1], None, 5), (PROMPTS[2], "r16", 14), (PROMPTS[3], "r4", 9),
            (PROMPTS[1], "r8", 3)]
    handles = []
    for step, (prompt, adapter, length) in enumerate(plan):
        params = SamplingParams(max_tokens=length, temperature=0, ignore_eos=True)
        handles.append(engine.submit(tokenizer(prompt)["input_ids"], params, adapter))
        engine.scheduler.waiting.extend(engine._take_inbox())
        for _ in range(step + 1):  # the earlier requests decode while this one waits to join
            engine.scheduler.step()
    engine.run_until_idle()
    for (prompt, adapter, length), handle in zip(plan, handles):
        result = handle.result()
        assert len(result.token_ids) == length and result.finish_reason == "length"
        params = SamplingParams(max_tokens=length, temperature=0, ignore_eos=True)
        assert result.token_ids == run_all(engine, [(tokenizer(prompt)["input_ids"], adapter)], params)[0].token_ids
    assert engine.scheduler.running == [] and engine.kv.rows == 16


def test_sampling_is_reproducible_per_request_and_greedy_at_its_limits(embedded_setup, tokenizer):
    _, _, engine = embedded_setup
    ids = tokenizer(PROMPTS[0])["input_ids"]

    def tokens(**settings):
        return run_all(engine, [(ids, "r8")], SamplingParams(max_tokens=16, ignore_eos=True, **settings))[0].token_ids

    greedy = tokens(temperature=0)
    assert tokens(temperature=0.9, seed=7) == tokens(temperature=0.9, seed=7)
    assert tokens(temperature=0.9, seed=7) != tokens(temperature=0.9, seed=8)
    assert tokens(temperature=1.0, top_k=1, seed=1) == greedy
    assert tokens(temperature=1.0, top_p=1e-6, seed=1) == greedy
    # a request's sampled tokens do not depend on its neighbours in the batch
    alone = tokens(temperature=0.8, seed=3)
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=3, ignore_eos=True)
    crowd = run_all(engine, [(ids, "r8")] + [(tokenizer(p)["input_ids"], "r4") for p in PROMPTS], params)
    assert crowd[0].token_ids == alone


def test_stop_strings_cut_the_text_and_streamed_pieces_add_up(embedded_setup, tokenizer):
    _, _, engine = embedded_setup
    ids = tokenizer(PROMPTS[0])["input_ids"]
    full = run_all(engine, [(ids, None)], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    assert stop.strip()
    handle = engine.submit(ids, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop, "@@@@"]))
    engine.run_until_idle()
    events = list(handle.events())
    text = "".join(e.text for e in events)
    assert text == full.text[:full.text.index(stop)]
    assert events[-1].finish_reason == "stop" and stop not in text
    assert events[-1].completion_tokens < 40


def test_the_end_of_sequence_token_stops_a_request(embedded_setup, tokenizer):
    """The shipped reverse-words adapter answers and then emits EOS: the request stops there, EOS not in the text."""
    _, _, engine = embedded_setup
    engine.add_adapter("reverse", str(Path(__file__).resolve().parents[1] / "examples" / "adapters" / "reverse"),
                       replace=True)
    ids = tokenizer("Reverse the words: king night sword\nAnswer:")["input_ids"]
    result = run_all(engine, [(ids, "reverse")], SamplingParams(max_tokens=50, temperature=0))[0]
    assert result.finish_reason == "stop" and result.token_ids[-1] in engine.scheduler.eos_ids
    assert result.text == " sword night king" and len(result.token_ids) < 50
    ignoring = run_all(engine, [(ids, "reverse")], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert ignoring.finish_reason == "length" and len(ignoring.token_ids) == 50
    engine.remove_adapter("reverse")  # the module's engine is shared


def test_the_adapter_cache_evicts_least_recently_used_and_waits_when_every_slot_is_pinned(embedded_setup, tokenizer):
    model, folders, _ = embedded_setup
    engine = Engine(EngineConfig(dtype="fp32", max_running=8, max_loaded_adapters=2, max_model_len=128),
                    model=copy.deepcopy(model), tokenizer=tokenizer)
    for name, folder in folders.items():
        engine.add_adapter(name, folder)
    ids = tokenizer(PROMPTS[1])["input_ids"]
    expected = {name: reference_tokens(model, folder, ids, GREEDY.max_tokens) for name, folder in folders.items()}
    for name in ["r4", "r8", "r4", "r16", "r8"]:  # r16 evicts r8 (least recently used), so r8 loads again
        assert run_all(engine, [(ids, name)])[0].token_ids == expected[name]
    assert engine.stats().adapter_loads_total == 4
    assert {i.name for i in engine.adapters() if i.resident} == {"r16", "r8"}
    # three adapters at once with two slots: the third waits for a slot, then runs; all are right
    results = run_all(engine, [(ids, name) for name in folders])
    assert [r.token_ids for r in results] == [expected[name] for name in folders]


def test_a_replaced_adapter_serves_its_new_content_and_changed_files_are_refused(embedded_setup, tokenizer, tmp_path):
    model, folders, _ = embedded_setup
    engine = Engine(EngineConfig(dtype="fp32", max_model_len=128), model=copy.deepcopy(model), tokenizer=tokenizer)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    first = engine.add_adapter("x", folders["r4"])
    assert run_all(engine, [(ids, "x")])[0].token_ids == reference_tokens(model, folders["r4"], ids, 12)
    with pytest.raises(AdapterError, match="already loaded"):
        engine.add_adapter("x", folders["r8"])
    second = engine.add_adapter("x", folders["r8"], replace=True)
    assert second.digest != first.digest
    assert run_all(engine, [(ids, "x")])[0].token_ids == reference_tokens(model, folders["r8"], ids, 12)
    # files rewritten behind the server's back change nothing: the engine serves what it checked
    moving = save_adapter(model, tmp_path / "moving", 8, seed=1)
    expected = reference_tokens(model, moving, ids, 12)
    engine.add_adapter("moving", moving)
    save_adapter(model, tmp_path / "moving", 8, seed=2)
    assert run_all(engine, [(ids, "moving")])[0].token_ids == expected
    # a request queued for an adapter that is then unloaded fails with a message instead of running
    queued = engine.submit(ids, GREEDY, "moving")
    engine.remove_adapter("moving")
    engine.run_until_idle()
    result = queued.result(timeout=5)
    assert result.finish_reason == "unloaded" and "unloaded or replaced" in result.error
    engine.remove_adapter("x")
    with pytest.raises(UnknownModelError, match="'x' does not exist"):
        engine.submit(ids, GREEDY, "x")


def test_bad_adapters_are_refused_with_a_message_naming_the_problem(embedded_setup, tmp_path, tokenizer):
    model, folders, engine = embedded_setup
    other = tiny("llama-gqa")
    cases = {
        "dora": (save_adapter(model, tmp_path / "dora", 8, 1, use_dora=True), "DoRA"),
        "rank": (save_adapter(model, tmp_path / "rank", 128, 1, target_modules=["q_proj"]), "--max-lora-rank 128"),
        "other-model": (save_adapter(other, tmp_path / "other", 8, 1), "trained for another base model"),
        "head": (save_adapter(model, tmp_path / "head", 8, 1, target_modules=["lm_head"]), "q/k/v/o/gate/up/down"),
        "saved": (save_adapter(model, tmp_path / "saved", 8, 1, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                  "modules_to_save"),
        "missing": (str(tmp_path / "nowhere"), "no such adapter folder"),
    }
    truncated = save_adapter(model, tmp_path / "truncated", 8, 1)
    weights = tmp_path / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cases["truncated"] = (truncated, "truncated")
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    for name, (folder, words) in cases.items():
        with pytest.raises((AdapterFileError, AdapterError)) as caught:
            engine.add_adapter(name, folder)
        assert words in str(caught.value), (name, str(caught.value))
    assert config["use_dora"] is True
    with pytest.raises(RequestError, match="base model's name"):
        engine.add_adapter(engine.model_name, folders["r4"])
    assert {i.name for i in engine.adapters()} == set(folders)  # nothing half-registered
    ids = tokenizer(PROMPTS[0])["input_ids"]
    assert run_all(engine, [(ids, "r4")])[0].finish_reason == "length"  # still serving


def test_bad_requests_are_refused_and_a_full_queue_says_when_to_retry(embedded_setup, tokenizer):
    model, _, _ = embedded_setup
    engine = Engine(EngineConfig(dtype="fp32", max_queue=2, max_model_len=64), model=copy.deepcopy(model),
                    tokenizer=tokenizer)
    with pytest.raises(RequestError, match="empty"):
        engine.submit([], GREEDY)
    with pytest.raises(RequestError, match="context length of 64"):
        engine.submit([5] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(RequestError, match=r"\[0, 4096\)"):
        engine.submit([5, 99999], GREEDY)
    with pytest.raises(UnknownModelError):
        engine.submit([5], GREEDY, "nobody")
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-5), dict(stop=[""])):
        with pytest.raises(RequestError):
            SamplingParams(**bad)
    engine.submit([5], GREEDY)
    engine.submit([5], GREEDY)
    with pytest.raises(QueueFullError) as full:
        engine.submit([5], GREEDY)
    assert full.value.retry_after >= 1
    engine.run_until_idle()
    engine.submit([5], GREEDY)  # room again once the queue drained


def test_a_cancelled_request_frees_its_row_and_adapter_at_the_next_step(embedded_setup, tokenizer):
    _, _, engine = embedded_setup
    ids = tokenizer(PROMPTS[0])["input_ids"]
    keep = engine.submit(ids, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), "r8")
    drop = engine.submit(ids, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), "r16")
    engine.scheduler.waiting.extend(engine._take_inbox())
    engine.scheduler.step()
    drop.cancel()
    engine.scheduler.step()
    assert [s.handle for s in engine.scheduler.running] == [keep]
    engine.run_until_idle()
    assert drop.result().finish_reason == "abort" and keep.result().finish_reason == "length"
    assert all(slot.pins == 0 for slot in engine.adapter_cache._resident.values())


def test_shutdown_lets_running_requests_finish_then_refuses_new_ones(embedded_setup, tokenizer):
    model, folders, _ = embedded_setup
    ids = tokenizer(PROMPTS[0])["input_ids"]
    for drain_timeout, expected in ((30.0, "length"), (0.0, "abort")):
        engine = Engine(EngineConfig(dtype="fp32", max_model_len=256), model=copy.deepcopy(model),
                        tokenizer=tokenizer)
        engine.add_adapter("r8", folders["r8"])
        engine.start()
        handles = [engine.submit(ids, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), adapter)
                   for adapter in ("r8", None)]
        for handle in handles:
            next(handle.events(timeout=30))  # both are running
        engine.shutdown(drain_timeout=drain_timeout)
        assert [h.result(timeout=5).finish_reason for h in handles] == [expected, expected]
        with pytest.raises(EngineStoppedError):
            engine.submit(ids, GREEDY)


def test_bf16_logits_stay_close_to_fp32(embedded_setup, tokenizer):
    model, folders, engine = embedded_setup
    half = Engine(EngineConfig(dtype="bf16", max_model_len=256), model=copy.deepcopy(model).bfloat16(),
                  tokenizer=tokenizer)
    half.add_adapter("r8", folders["r8"])
    ids = torch.tensor([tokenizer(PROMPTS[2])["input_ids"]])
    positions = torch.arange(ids.shape[1])[None]
    last = torch.tensor([ids.shape[1] - 1])
    logits = {}
    for name, e in (("fp32", engine), ("bf16", half)):
        slot = e.adapter_cache.acquire(e.adapter_cache.lookup("r8"))
        logits[name] = e.runner.forward_prompts(ids, positions, last, e.slots.batch([slot]))
        e.adapter_cache.release(slot)
    p, q = logits["fp32"].softmax(-1), logits["bf16"].softmax(-1)
    assert 0.5 * (p - q).abs().sum() < 0.05  # total variation distance of the next-token distributions
    assert logits["fp32"].argmax() == logits["bf16"].argmax()


@pytest.mark.parametrize("form", FORMS)
def test_every_projection_form_computes_the_same_product(form):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(48, 32), torch.randn(48), torch.randn(3, 5, 32)
    if not form_available(form, weight):
        pytest.skip(f"the {form} form is not available here (no oneDNN, or no compiled kernel)")
    projection = Projection(weight, bias, form)
    reference = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(projection(x), reference, rtol=1e-5, atol=1e-4)
    rows = x.reshape(15, 32)
    one_at_a_time = torch.cat([projection(rows[i:i + 1]) for i in range(15)])
    assert torch.equal(one_at_a_time, projection(rows)) or form not in OWN_LAYOUT  # batch-size independent
    assert torch.equal(projection.weight, weight)  # unpacked exactly, whatever the layout


@pytest.mark.parametrize("out_features, in_features", [(1, 1), (64, 16), (65, 17), (130, 300), (200, 47)])
def test_the_panels_kernel_agrees_with_float64_and_ignores_the_batch_for_every_shape(out_features, in_features):
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features)
    if not form_available("panels", weight):
        pytest.skip("lorakit's compiled CPU kernel cannot be built here")
    bias = torch.randn(out_features)
    projection, plain = Projection(weight, bias, "panels"), Projection(weight, None, "panels")
    x = torch.randn(37, in_features, dtype=torch.float64).float()
    reference = (x.double() @ weight.double().t() + bias.double()).float()
    for rows in (1, 2, 3, 4, 5, 8, 16, 37):
        torch.testing.assert_close(projection(x[:rows]), reference[:rows], rtol=1e-5, atol=1e-4)  # fp32 sums of `in`
        assert torch.equal(projection(x[:rows]), projection(x)[:rows])  # a row's result ignores its batch
    torch.testing.assert_close(plain(x.view(37, 1, in_features)), reference.view(37, 1, -1) - bias, rtol=1e-5,
                               atol=1e-4)


def test_equal_width_projections_are_expanded_together():
    assert equal_width_runs((512, 512, 512)) == [(0, 3)]
    assert equal_width_runs((512, 128, 128)) == [(0, 1), (1, 2)]
    assert equal_width_runs((1376, 1376)) == [(0, 2)]


@pytest.mark.parametrize("form", OWN_LAYOUT)
def test_an_engine_that_loads_its_model_holds_the_packed_weights_once_and_gives_the_same_tokens(monkeypatch, form):
    import lorakit.engine.runner as runner

    if not form_available(form, torch.zeros(1, 1)):
        pytest.skip(f"the {form} form is not available here")
    monkeypatch.setattr(runner, "choose_form", lambda weights: form)
    owner = Engine(EngineConfig(dtype="fp32", kv_cache_memory=64 << 20))  # loads the embedded model itself
    given = Engine(EngineConfig(dtype="fp32", kv_cache_memory=64 << 20), model=load_model(None),
                   tokenizer=owner.tokenizer)
    q_proj = owner.model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.numel() == 0 and given.model.model.layers[0].self_attn.q_proj.weight.numel() > 0
    assert all(p.weight is not None and p._plain is None for groups in owner.runner.base_weights
               for p in groups.values())
    ids = owner.tokenizer.encode("To be, or not to be, that is the question:")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    tokens = []
    for engine in (owner, given):
        handle = engine.submit(ids, params)
        engine.run_until_idle()
        tokens.append(handle.result().token_ids)
    assert tokens[0] == tokens[1]
    with owner.runner.module_weights():  # the model's own modules run again for the length of the block
        logits = owner.model(torch.tensor([ids])).logits[0, -1]
    assert int(logits.argmax()) == tokens[0][0] and q_proj.weight.numel() == 0
