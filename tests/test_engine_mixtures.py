"""Per-request adapter mixtures in the engine: each row's update is Σ_j w_j s_j (x A_j^T) B_j^T, on the compiled
kernel and the batched-products reference alike, so a mixed batch (base, one adapter, mixtures) gives every
row what the merged weights W + Σ w·s·B A give, and what `lorakit.compose` (linear) gives offline."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.engine import Engine, EngineConfig, SamplingParams
from lorakit.engine.layout import PROJECTION_GROUP, DecoderLayout
from lorakit.engine.lora_gathered import GatheredLora
from lorakit.engine.lora_kernel import SlotLora, cpu_kernel
from lorakit.engine.lora_slots import LoraSlots
from lorakit.engine.mixture import MAX_MIXTURE
from lorakit.engine.served_adapter import fit_to_layout
from lorakit.errors import RequestError, UnknownModelError
from lorakit.models import load_tokenizer

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 230, 9], [40, 41], [7] * 9, [300, 12, 12, 64, 2]]
# (rank, LoraConfig fields): mixed ranks (12 pads the slots to 16), rsLoRA on q and v only
SPECS = {"r4": (4, {}), "r12": (12, {}), "rs8": (8, {"use_rslora": True, "target_modules": ["q_proj", "v_proj"]})}
MIXTURES = [{"r4": 0.7, "r12": -0.3}, {"r12": 0.5, "rs8": 1.5, "r4": -1.25}]


def odd_llama():
    """Widths that are not multiples of the kernel's 16 lanes; grouped-query attention; the embedded vocabulary."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model_and_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtures")
    model = odd_llama()
    folders = {}
    for seed, (name, (rank, config)) in enumerate(SPECS.items()):
        adapted = copy.deepcopy(model)
        torch.manual_seed(seed)
        config = {"target_modules": "all-linear", **config}
        lorakit.add_adapter(adapted, lorakit.LoraConfig(r=rank, lora_alpha=3 * rank, init_lora_weights=False,
                                                        **config))
        folders[name] = str(lorakit.save_adapter(adapted, root / name))
    return model, folders


def merged_reference(model, folders, mixture: dict[str, float]):
    """A copy of `model` whose weights are W + Σ w·s·B A (fp64 sums, then fp32): the mixture merged by hand."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, weight in mixture.items():
            for module, factors in lorakit.Adapter.read(folders[name]).modules.items():
                target = merged.get_submodule(module.removeprefix("base_model.model."))
                delta = weight * factors.scale * (factors.b.double() @ factors.a.double())
                target.weight.copy_((target.weight.double() + delta).float())
    return merged


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits - reference).abs().max() / reference.abs().max())


def engine_on(model, folders, path: str = "kernel", **config) -> Engine:
    engine = Engine(EngineConfig(max_running=4, max_model_len=128, **config), model=copy.deepcopy(model),
                    tokenizer=load_tokenizer(None))
    if path == "reference":
        engine.slots.kernel = None
    for name, folder in folders.items():
        engine.add_adapter(name, folder)
    return engine


@pytest.mark.skipif(cpu_kernel() is None, reason="the CPU LoRA kernel could not be built here")
@pytest.mark.parametrize("adapter_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_kernel_and_reference_add_each_rows_mixture(model_and_folders, adapter_dtype, tokens):
    model, folders = model_and_folders
    layout = DecoderLayout(model)
    slots = LoraSlots(layout, 4, torch.device("cpu"), torch.float32, adapter_dtype)
    adapters = [fit_to_layout(lorakit.Adapter.read(folder), layout, 64) for folder in folders.values()]
    for slot, adapter in enumerate(adapters):
        slots.write(slot, adapter)
    # a mixture with a negative weight, the base, one adapter, three mixed with a slot twice, a one-pair mixture
    rows = [((0, 0.7), (1, -0.3)), -1, 2, ((1, 0.5), (0, 0.25), (2, 2.0), (0, -1.0)), ((2, 1.0),)]
    kernel, reference = SlotLora(slots, rows, 16), GatheredLora.from_slots(slots, rows, 16)
    torch.manual_seed(1)
    for layer in range(layout.num_layers):
        for group, shape in layout.shapes.items():
            x = torch.randn(len(rows), tokens, shape.in_features)
            y = torch.randn(len(rows), tokens, sum(shape.out_features))
            fast = kernel.apply(layer, group, x, y.clone())
            torch.testing.assert_close(fast, reference.apply(layer, group, x, y.clone()), rtol=1e-5, atol=1e-5)
            assert torch.equal(fast[1], y[1])  # the base row: untouched
            assert torch.equal(fast[4], SlotLora(slots, [2], 16).apply(layer, group, x[4:], y[4:].clone())[0])
            if adapter_dtype == "fp32":  # the files' own math, in fp64
                pairs = [((0, 0.7), (1, -0.3)), (), ((2, 1.0),), rows[3], rows[4]]
                for row, row_pairs in enumerate(pairs):
                    expected = y[row].double() + sum((weight * _update(adapters[slot], layout, layer, group, x[row])
                                                      for slot, weight in row_pairs), torch.zeros(()))
                    torch.testing.assert_close(fast[row].double(), expected, rtol=1e-5, atol=1e-5)


def _update(adapter, layout, layer, group, x):
    """s·(x A^T) B^T of each projection of the group, from the adapter's tensors (fp64)."""
    pieces = [torch.zeros(*x.shape[:-1], width, dtype=torch.float64) for width in layout.shapes[group].out_features]
    for (where, projection), (a, b, scale) in adapter.factors.items():
        found, part = PROJECTION_GROUP[projection]
        if where == layer and found == group:
            pieces[part] = scale * (x.double() @ a.double().t()) @ b.double().t()
    return torch.cat(pieces, -1)


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_one_pass_with_base_adapter_and_mixture_rows_matches_the_merged_weights(model_and_folders, path):
    if path == "kernel" and cpu_kernel() is None:
        pytest.skip("the CPU LoRA kernel could not be built here")
    model, folders = model_and_folders
    engine = engine_on(model, folders, path)
    choices = [None, "r12", *MIXTURES]
    cache = engine.adapter_cache
    rows = [tuple((cache.acquire(cache.lookup(name)), weight) for name, weight in mixture.items())
            for mixture in ({}, {"r12": 1.0}, *MIXTURES)]
    longest = max(len(p) for p in PROMPTS)
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in PROMPTS])
    last = torch.tensor([len(p) - 1 for p in PROMPTS])
    logits = engine.runner.forward_prompts(ids, torch.arange(longest).expand(len(PROMPTS), longest), last,
                                           engine.slots.batch(rows))  # one forward pass for the four rows
    for row, (choice, prompt) in enumerate(zip(choices, PROMPTS)):
        mixture = {} if choice is None else {choice: 1.0} if isinstance(choice, str) else choice
        with torch.no_grad():
            reference = merged_reference(model, folders, mixture)(input_ids=torch.tensor([prompt])).logits[0, -1]
        assert relative_error(logits[row], reference) <= 1e-4, (choice, relative_error(logits[row], reference))


def test_mixed_batches_decode_the_merged_weights_tokens_and_the_composed_adapters(model_and_folders):
    model, folders = model_and_folders
    engine = engine_on(model, folders)
    for i, mixture in enumerate(MIXTURES):  # the same mixtures composed offline (exact linear), served as adapters
        engine.add_adapter(f"composed{i}", lorakit.compose({n: folders[n] for n in mixture}, list(mixture.values())))
    choices = [None, "r4", *MIXTURES]
    handles = [engine.submit(prompt, GREEDY, choice) for prompt, choice in zip(PROMPTS, choices)]
    engine.run_until_idle()
    mixed = [h.result().token_ids for h in handles]
    for prompt, choice, tokens in zip(PROMPTS, choices, mixed):
        mixture = {} if choice is None else {choice: 1.0} if isinstance(choice, str) else choice
        reference, ids = merged_reference(model, folders, mixture), torch.tensor([prompt])
        with torch.no_grad():
            expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                          min_new_tokens=10, do_sample=False, pad_token_id=0)
        assert tokens == expected[0, len(prompt):].tolist(), choice
    composed = [engine.submit(prompt, GREEDY, f"composed{i}") for i, prompt in enumerate(PROMPTS[2:])]
    engine.run_until_idle()
    assert [h.result().token_ids for h in composed] == mixed[2:]


def test_a_one_adapter_mixture_at_weight_one_is_that_adapter(model_and_folders):
    model, folders = model_and_folders
    engine = engine_on(model, folders)
    handles = [engine.submit(PROMPTS[0], GREEDY, choice) for choice in ("rs8", {"rs8": 1.0})]
    engine.run_until_idle()
    alone, mixed = (h.result().token_ids for h in handles)
    assert alone == mixed


@pytest.mark.parametrize("mixture, error, words", [
    ({}, RequestError, ["adapters", "empty"]),
    ({f"a{i}": 0.1 for i in range(MAX_MIXTURE + 1)}, RequestError, ["adapters", f"at most {MAX_MIXTURE}"]),
    ({"r4": float("nan")}, RequestError, ["'r4'", "finite"]),
    ({"r4": True}, RequestError, ["'r4'", "finite"]),
    ({"r4": 0.5, "nope": 0.5}, UnknownModelError, ["'nope'"]),
    ({"r4": 0.5, "base": 0.5}, RequestError, ["base model"]),
])
def test_bad_mixtures_are_refused_with_a_message_naming_the_problem(model_and_folders, mixture, error, words):
    model, folders = model_and_folders
    engine = engine_on(model, {"r4": folders["r4"]}, served_model_name="base")
    with pytest.raises(error) as raised:
        engine.submit(PROMPTS[0], GREEDY, mixture)
    assert all(word in str(raised.value) for word in words), str(raised.value)


def test_a_mixture_larger_than_the_slots_can_hold_ends_with_an_error(model_and_folders):
    model, folders = model_and_folders
    engine = engine_on(model, folders, max_loaded_adapters=2)
    handles = [engine.submit(PROMPTS[0], GREEDY, {"r4": 0.5, "r12": 0.5, "rs8": 0.5}),
               engine.submit(PROMPTS[1], GREEDY, {"r4": 0.5, "r12": 0.5})]
    engine.run_until_idle()
    too_large, fits = (h.result() for h in handles)
    assert too_large.finish_reason == "error" and "needs 3 adapters" in too_large.error
    assert fits.finish_reason == "length" and len(fits.token_ids) == GREEDY.max_tokens
    assert all(entry.pins == 0 for entry in engine.adapter_cache._resident.values())
