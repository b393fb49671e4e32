"""A failure belongs to its request: faults in one request or adapter end that request with an error and
the engine keeps serving everyone else; the slots grow within their memory budget; a stuck engine is
reported and does not block shutdown. Real engines on the embedded model; faults that nothing real on a
CPU can trigger (out of memory, a kernel that raises) are injected into the one component they come from."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.engine import Engine, EngineConfig, SamplingParams
from lorakit.engine import engine as engine_module
from lorakit.models import load_model, load_tokenizer
from test_engine import reference_tokens, save_adapter

GREEDY = SamplingParams(max_tokens=12, temperature=0)
PROMPT = "To be, or not to be, that is the question:"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def model():
    return load_model(None)


@pytest.fixture(scope="module")
def good(model, tmp_path_factory):
    return save_adapter(model, tmp_path_factory.mktemp("good") / "a", 8, seed=3)


def _engine(model, tokenizer, **config) -> Engine:
    import copy

    return Engine(EngineConfig(dtype="fp32", max_running=8, max_model_len=128, **config), model=copy.deepcopy(model),
                  tokenizer=tokenizer)


def test_an_adapter_whose_outputs_overflow_fails_only_its_own_request(model, tokenizer, good, tmp_path):
    # Values far beyond any trained adapter but below the reader's 1e18 sanity bound: they reach the forward
    # pass and turn the logits into infinities and NaNs.
    bad = save_adapter(model, tmp_path / "bad", 8, seed=4)
    weights = f"{bad}/adapter_model.safetensors"
    save_file({k: torch.full_like(t, 1e17) for k, t in load_file(weights).items()}, weights, metadata={"format": "pt"})
    engine = _engine(model, tokenizer)
    engine.add_adapter("good", good)
    engine.add_adapter("bad", bad)
    ids = tokenizer(PROMPT)["input_ids"]
    handles = [engine.submit(ids, GREEDY, "good"), engine.submit(ids, GREEDY, "bad"), engine.submit(ids, GREEDY)]
    engine.run_until_idle()
    fine, broken, base = (h.result() for h in handles)
    assert broken.finish_reason == "error" and "non-finite" in broken.error
    assert fine.token_ids == reference_tokens(model, good, ids, 12)
    assert base.token_ids == reference_tokens(model, None, ids, 12)


def test_a_fault_while_writing_an_adapter_into_a_slot_fails_only_that_request(model, tokenizer, good, tmp_path):
    other = save_adapter(model, tmp_path / "other", 8, seed=5)
    engine = _engine(model, tokenizer)
    engine.add_adapter("good", good)
    doomed = engine.add_adapter("doomed", other)
    write = engine.slots.write

    def out_of_memory_for_one(slot, adapter):  # what growing the slots on a full machine raises
        if adapter.digest == doomed.digest:
            raise torch.OutOfMemoryError("CPU out of memory")
        return write(slot, adapter)

    engine.slots.write = out_of_memory_for_one
    ids = tokenizer(PROMPT)["input_ids"]
    handles = [engine.submit(ids, GREEDY, "doomed"), engine.submit(ids, GREEDY, "good")]
    engine.run_until_idle()
    failed, fine = (h.result() for h in handles)
    assert failed.finish_reason == "error" and "out of memory" in failed.error
    assert fine.token_ids == reference_tokens(model, good, ids, 12)
    engine.slots.write = write  # the slot it had claimed was given back: the adapter loads once memory allows
    again = engine.submit(ids, GREEDY, "doomed")
    engine.run_until_idle()
    assert again.result().token_ids == reference_tokens(model, other, ids, 12)


def test_a_forward_pass_that_raises_for_one_row_is_retried_row_by_row(model, tokenizer, good, tmp_path):
    other = save_adapter(model, tmp_path / "other", 8, seed=6)
    engine = _engine(model, tokenizer)
    engine.add_adapter("good", good)
    engine.add_adapter("faulty", other)
    ids = tokenizer(PROMPT)["input_ids"]
    handles = [engine.submit(ids, SamplingParams(max_tokens=12, temperature=0), name) for name in ("good", "faulty")]
    engine.run_until_idle()  # both resident and decoded together once
    faulty_slot = engine.adapter_cache._find(engine.adapter("faulty").digest)
    batch = engine.slots.batch

    def kernel_fault(rows, active=None):  # a LoRA kernel that fails on one adapter's rows
        if any(slot == faulty_slot for row in rows for slot, _ in row):
            raise RuntimeError("kernel fault")
        return batch(rows, active)

    engine.slots.batch = kernel_fault
    handles = [engine.submit(ids, GREEDY, name) for name in ("good", "faulty", None)]
    engine.run_until_idle()
    fine, failed, base = (h.result() for h in handles)
    assert failed.finish_reason == "error" and "internal error" in failed.error
    assert fine.token_ids == reference_tokens(model, good, ids, 12)
    assert base.token_ids == reference_tokens(model, None, ids, 12)


def test_slots_grow_while_the_memory_budget_allows_and_evict_beyond_it(model, tokenizer, tmp_path):
    folders = [save_adapter(model, tmp_path / f"a{i}", 8, seed=10 + i) for i in range(10)]
    ids = tokenizer(PROMPT)["input_ids"]
    roomy = _engine(model, tokenizer)
    for i, folder in enumerate(folders):
        roomy.add_adapter(f"a{i}", folder)
    handles = [roomy.submit(ids, GREEDY, f"a{i}") for i in range(10)]
    roomy.run_until_idle()
    results = [h.result() for h in handles]
    assert all(r.finish_reason == "length" for r in results)
    assert roomy.slots.num_slots >= 10 and roomy.stats().resident_adapters == 10  # every adapter stays resident

    per_slot = roomy.slots.bytes_for(1, 8, torch.float32)
    tight = _engine(model, tokenizer, adapter_memory=3 * per_slot)
    for i, folder in enumerate(folders[:5]):
        tight.add_adapter(f"a{i}", folder)
    handles = [tight.submit(ids, GREEDY, f"a{i}") for i in range(5)]
    tight.run_until_idle()
    assert tight.slots.num_slots <= 3 and tight.stats().resident_adapters <= 3
    assert [h.result().token_ids for h in handles[:2]] == [reference_tokens(model, f, ids, 12) for f in folders[:2]]


def test_a_stuck_engine_is_reported_and_shutdown_still_returns(model, tokenizer, monkeypatch):
    monkeypatch.setattr(engine_module, "SHUTDOWN_GRACE_SECONDS", 0.5)
    engine = _engine(model, tokenizer, stall_timeout=0.3).start()
    release = threading.Event()
    step = engine.scheduler.step

    def hang():  # a step that never returns (a kernel deadlock, a stuck device)
        release.wait(30)
        return step()

    engine.scheduler.step = hang
    ids = tokenizer(PROMPT)["input_ids"]
    handle = engine.submit(ids, GREEDY)
    time.sleep(0.6)
    assert engine.health()[0] == "stuck"
    started = time.monotonic()
    engine.shutdown(drain_timeout=0.2)
    assert time.monotonic() - started < 3
    assert handle.result(timeout=5).finish_reason == "abort"
    release.set()
    engine._thread.join(10)  # the thread it left behind finishes once unblocked
