"""Merged/unmerged switching: merged steps give the unmerged path's greedy tokens, the base weights stay
bit-identical however often the engine merges and unmerges, a minority adapter's request is served within
the bound while the majority runs merged, and "auto" stays unmerged when merging does not pay."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.engine import Engine, EngineConfig, SamplingParams
from lorakit.engine import runner as runner_module
from lorakit.engine import switching as switching_module
from lorakit.engine.projection import FORMS, Projection, form_available
from lorakit.engine.switching import Switching
from lorakit.errors import ConfigError
from lorakit.models import load_tokenizer

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
# merge/unmerge cycles per projection form (benchmarks/switching.py runs 10,000); a packed merge reorders
# every weight for oneDNN, ~1 ms each on one thread, several on two busy ones
CYCLES = {"left": 1_000, "packed": 100, "panels": 100}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny Llama, two adapters on different projections, and its tokenizer."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    folders = {}
    for name, seed, targets in (("a", 1, ["q_proj", "v_proj", "down_proj"]), ("b", 2, "all-linear")):
        adapted = copy.deepcopy(model)
        torch.manual_seed(seed)
        lorakit.add_adapter(adapted, lorakit.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                        target_modules=targets))
        folders[name] = lorakit.save_adapter(adapted, tmp_path_factory.mktemp(name))
    return model, folders, load_tokenizer(None)


def engine_for(served, mode: str, **config) -> Engine:
    model, folders, tokenizer = served
    engine = Engine(EngineConfig(max_model_len=96, max_running=4, switching=mode, **config),
                    model=copy.deepcopy(model), tokenizer=tokenizer)
    for name, folder in folders.items():
        engine.add_adapter(name, folder)
    return engine


def run_all(engine: Engine, requests) -> list[list[int]]:
    handles = [engine.submit(ids, GREEDY, adapter) for ids, adapter in requests]
    engine.run_until_idle()
    return [h.result().token_ids for h in handles]


REQUESTS = ([([5, 6, 7, i], "a") for i in range(6)] + [([9, 9, i], "b") for i in range(3)]
            + [([3, 4, 5], {"a": 0.5, "b": -0.25}), ([8, 1], None)])


@pytest.mark.parametrize("mode", ["merged", "auto", "turns-merged"])
def test_merged_steps_give_the_unmerged_greedy_tokens(served, mode, monkeypatch):
    monkeypatch.setattr(switching_module, "PROBE_MIN_STEPS", 0)  # these few requests are worth a merge
    unmerged = run_all(engine_for(served, "off"), REQUESTS)
    engine = engine_for(served, "off")
    engine.scheduler.switching = Switching(mode, engine.runner, engine.slots, engine.adapter_cache.is_current, rows=4)
    assert run_all(engine, REQUESTS) == unmerged
    stats = engine.stats().switching
    assert stats.merged_seconds > 0 and stats.switches >= 2  # steps really ran merged, then unmerged again


@pytest.mark.parametrize("form", FORMS)
def test_a_merged_projection_is_the_summed_weight_and_leaves_the_base_alone(form):
    if not form_available(form, torch.zeros(1, 1)):
        pytest.skip(f"the {form} form is not available here")
    torch.manual_seed(0)
    weight, bias, delta, x = torch.randn(24, 16), torch.randn(24), torch.randn(24, 16) * 0.01, torch.randn(5, 16)
    base = Projection(weight.clone(), bias, form)
    merged = base.plus(delta.clone())  # plus writes the sum into the tensor it is given
    torch.testing.assert_close(merged(x), F.linear(x, weight + delta, bias))
    assert torch.equal(base.weight, weight) and torch.equal(base(x), Projection(weight, bias, form)(x))


def base_tensors(engine: Engine) -> list[torch.Tensor]:
    """Copies of every base tensor a step can read: fused weights, biases, packed copies, the model's own."""
    tensors = [t for layer in engine.runner.base_weights for p in layer.values()
               for t in (p.weight, p.bias, p.packed) if t is not None] + list(engine.model.state_dict().values())
    return [t.to_dense() if t.is_mkldnn else t.clone() for t in tensors]


@pytest.mark.parametrize("form", ["packed", "panels", "left"])
def test_base_weights_are_bit_identical_after_many_merge_cycles(served, form, monkeypatch):
    if not form_available(form, torch.zeros(1, 1)):
        pytest.skip(f"the {form} form is not available here")
    monkeypatch.setattr(runner_module, "choose_form", lambda weights: form)
    engine = engine_for(served, "off")  # steps on the base; the merges below are the only ones
    before = base_tensors(engine)
    rows = []
    for name in ("a", "b"):
        info = engine.adapter_cache.lookup(name)
        rows.append(SimpleNamespace(adapters=((info, 1.0),), row_pairs=((engine.adapter_cache.acquire(info), 1.0),)))
    switching = engine.scheduler.switching
    for i in range(CYCLES[form]):  # alternate: every merge builds W + ΔW anew, every unmerge goes back to the base
        row = rows[i % 2]
        assert switching.merged(row.adapters, row.row_pairs) is not switching.runner.base_weights
        assert switching.weights([row]) is None  # unmerged: the next step runs on the base
    assert switching.stats.merges_built == CYCLES[form]
    assert all(torch.equal(a, b) for a, b in zip(before, base_tensors(engine)))
    for row in rows:
        engine.adapter_cache.release(row.row_pairs[0][0])
    assert run_all(engine, REQUESTS) == run_all(engine_for(served, "off"), REQUESTS)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("mode", ["auto", "turns-merged"])
def test_a_minority_request_is_served_within_the_bound_while_the_majority_runs_merged(served, mode, monkeypatch):
    monkeypatch.setattr(switching_module, "MIN_SAVING", float("-inf"))  # merging always pays: a tiny model's
    monkeypatch.setattr(switching_module, "PROBE_MIN_STEPS", 0)          # measured saving is noise, and this
    # test is about the bound
    engine = engine_for(served, "off")
    clock, bound, step = FakeClock(), 1.0, 0.1
    policy = Switching(mode, engine.runner, engine.slots, engine.adapter_cache.is_current, rows=4, max_hold=bound,
                       clock=clock)
    engine.scheduler.switching = policy
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    handles = [engine.submit([5, 6, i], params, "a") for i in range(8)]
    minority, held_since, merged_while_held = None, None, False
    while engine.scheduler.has_work or engine._inbox:
        if clock.now < 4.0:  # the majority's requests keep arriving, one a step
            handles.append(engine.submit([5, 7, len(handles)], params, "a"))
        if minority is None and clock.now >= 0.5:
            minority = engine.submit([9, 9, 9], params, "b")
        engine.scheduler.waiting.extend(engine._take_inbox())
        engine.scheduler.step()
        clock.now += step
        if minority is not None and minority.first_token_at is None and minority.id in policy._held:
            held_since = policy._held[minority.id]
            merged_while_held |= policy.stats.merged_lane == "a"
        if minority is not None and minority.first_token_at is not None and held_since is not None:
            served_at = clock.now
            break
    assert held_since is not None, "the minority request was never held back"
    assert merged_while_held  # it waited while the majority ran on merged weights
    # held at most `bound`, then admitted at the next free row (rows free up every <= 6 steps)
    assert served_at - held_since <= bound + 6 * step + step
    engine.run_until_idle()
    assert all(h.result().finish_reason == "length" for h in handles + [minority])


def stub(lane: tuple, index: int, max_tokens: int = 32, generated: int = 0) -> SimpleNamespace:
    return SimpleNamespace(adapters=lane, handle=SimpleNamespace(id=f"r{index}"), max_new_tokens=max_tokens,
                           output_ids=[0] * generated)


def test_auto_takes_turns_under_contention_and_merges_only_when_the_measured_saving_pays():
    a, b = (("a", 1.0),), (("b", 1.0),)
    policy = Switching("auto", runner=None, slots=None, is_current=lambda info: True, rows=4, max_hold=1.0)

    def turn(waiting, running=()):
        policy.target = None
        policy.plan(waiting, list(running))
        return policy.target, policy._merging

    contended = [stub(a, i) for i in range(6)] + [stub(b, 9)]
    assert turn(contended) == (a, True)  # never measured: a turn this long merges to measure it
    for merged, seconds in ((False, 0.010), (True, 0.0099)):
        policy.times.add(merged, 4, seconds)
    assert turn(contended) == (a, False)  # 1% saved: a's turn runs unmerged
    policy.times.add(True, 4, 0.005)
    policy.times.add(True, 4, 0.005)
    assert turn(contended) == (a, True)  # half the step saved
    assert turn([stub(a, 1), stub(b, 2)], [stub(a, 3)]) == (None, False)  # rows free for all: arrival order
    assert turn([stub(a, 1)], [stub(a, 2)])[0] == a  # every request on one adapter: it merges holding no one


def test_switching_settings_are_checked():
    with pytest.raises(ConfigError, match="switching must be one of"):
        EngineConfig(switching="sometimes")
    with pytest.raises(ConfigError, match="switching_max_hold"):
        EngineConfig(switching_max_hold=0)


def test_metrics_show_time_merged_and_switches(served):
    from lorakit.serve.metrics import ServeMetrics

    engine = engine_for(served, "merged")
    run_all(engine, REQUESTS)
    text = ServeMetrics(engine).text().decode()
    for name in ("lorakit_merged_seconds_total", "lorakit_weight_switches_total", "lorakit_merged_weights"):
        assert name in text
    switches = next(line for line in text.splitlines() if line.startswith("lorakit_weight_switches_total"))
    assert float(switches.split()[-1]) >= 2


def test_unloading_an_adapter_keeps_its_merged_copy_for_the_sequences_still_running(served, monkeypatch):
    """A sequence admitted before its adapter is unloaded finishes on it; the merged copy serving it is built
    once, not again at every step (which made each of its tokens cost a whole merge)."""
    monkeypatch.setattr(switching_module, "PROBE_MIN_STEPS", 0)
    engine = engine_for(served, "merged")
    handle = engine.submit([5, 6, 7], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), "a")
    with torch.no_grad():
        engine.scheduler.waiting.extend(engine._take_inbox())
        for _ in range(3):                    # prefill and two decode steps, merged
            engine.scheduler.step()
    engine.remove_adapter("a")
    engine.run_until_idle()
    assert len(handle.result().token_ids) == 40
    assert engine.stats().switching.merges_built == 1
    engine.scheduler.switching.plan([], [])   # the last sequence has left: the copy goes
    assert engine.scheduler.switching._copy == (None, None)
