"""`lorakit.compose` and `lorakit compose`: exact sums against a model whose weights are W + Σ wᵢ ΔWᵢ, the
identity property, truncation and pruning, loading in PEFT, and the refusals."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import lorakit
from lorakit import Adapter, LoraConfig, add_adapter, save_adapter
from lorakit.compose import composition
from lorakit.compose.factors import Term, pruned
from lorakit.errors import ConfigError
from tiny_models import llama, output_of


def trained(model, config: LoraConfig, seed: int, folder) -> Adapter:
    """An adapter with random non-zero factors (as if trained), saved to `folder` and read back."""
    work = copy.deepcopy(model)
    add_adapter(work, config.replace(init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in work.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    save_adapter(work, folder)
    return Adapter.read(folder)


def delta(factors) -> torch.Tensor:
    """ΔW = s B A of one module (linear layers)."""
    return factors.scale * factors.b.double() @ factors.a.double()


def reference(model, parts: list[tuple[Adapter, float]]):
    """A copy of the model with W + Σ w ΔW written into its weights: the composition's ground truth."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for adapter, weight in parts:
            for module, factors in adapter.modules.items():
                layer = ref.get_submodule(module)
                layer.weight.copy_((layer.weight.double() + weight * delta(factors)).float())
    return ref


def run(model, adapter: Adapter, inputs) -> torch.Tensor:
    served = copy.deepcopy(model)
    lorakit.load_adapter(served, adapter)
    return output_of(served, inputs)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.fixture(scope="module")
def tiny():
    return llama()


@pytest.fixture(scope="module")
def three(tiny, tmp_path_factory):
    """Mixed ranks, an rsLoRA adapter, a rank_pattern, and different target modules."""
    model, _ = tiny
    root = tmp_path_factory.mktemp("inputs")
    a = trained(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 1, root / "a")
    b = trained(model, LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["v_proj", "o_proj"]), 2,
                root / "b")
    c = trained(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "down_proj"],
                                  rank_pattern={"down_proj": 6}), 3, root / "c")
    return a, b, c


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_linear_and_cat_equal_the_merged_weights_for_mixed_ranks_negative_weights_rslora_and_targets(
        tiny, three, method):
    model, inputs = tiny
    a, b, c = three
    weights = [0.7, -0.3, 1.5]
    mix = lorakit.compose({"a": a, "b": b, "c": c}, weights, method=method)
    assert mix.config.r == 4 + 8 + 6 and mix.config.lora_alpha == mix.config.r and not mix.config.rank_pattern
    want = output_of(reference(model, list(zip(three, weights))), inputs)
    assert relative_error(run(model, mix, inputs), want) <= 1e-5
    for module in mix.modules:                        # and module by module, exactly the weighted sum
        expected = sum(w * delta(x.modules[module]) for x, w in zip(three, weights) if module in x.modules)
        assert torch.allclose(delta(mix.modules[module]), expected, atol=1e-6)


def test_one_adapter_with_weight_one_comes_back_unchanged_for_every_variant(tiny, tmp_path):
    model, _ = tiny
    variants = {
        "plain": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
        "rslora": LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]),
        "patterns": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                               alpha_pattern={"v_proj": 3}),
    }
    for name, config in variants.items():
        adapter = trained(model, config, 5, tmp_path / name)
        for method, options in [("linear", {}), ("cat", {}), ("svd", {}), ("ties", {"density": 1.0})]:
            assert lorakit.compose([adapter], [1.0], method=method, **options).digest == adapter.digest, (name, method)


def test_a_single_rslora_adapter_scaled_by_a_half_is_exactly_half_the_update(tiny, three):
    model, inputs = tiny
    _, b, _ = three
    half = lorakit.compose([b], [0.5])
    assert not half.config.use_rslora
    assert relative_error(run(model, half, inputs), output_of(reference(model, [(b, 0.5)]), inputs)) <= 1e-5


def test_svd_keeps_the_best_rank_r_part_and_reports_the_energy_it_kept(three):
    a, b, c = three
    full = lorakit.compose([a, b, c], [1.0, 1.0, 1.0])
    made = composition([a, b, c], [1.0, 1.0, 1.0], method="svd", rank=4)
    assert made.adapter.config.r == 4
    for module, kept in made.kept.items():
        exact = delta(full.modules[module])
        s = torch.linalg.svdvals(exact)
        assert kept == pytest.approx(float((s[:4] ** 2).sum() / (s ** 2).sum()), rel=1e-6)
        error = exact - delta(made.adapter.modules[module])
        assert float(error.norm() ** 2) == pytest.approx(float((s[4:] ** 2).sum()), rel=1e-4, abs=1e-9)
    lossless = composition([a, b, c], [1.0, 1.0, 1.0], method="svd", rank=18)
    assert min(lossless.kept.values()) == pytest.approx(1.0)


def test_pruning_methods_work_on_the_full_update_and_are_reproducible_from_the_recorded_seed(three):
    a, b, _ = three
    for method in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        first = composition([a, b], [0.6, 0.4], method=method, density=0.5, seed=3, rank=12)
        again = composition([a, b], [0.6, 0.4], method=method, density=0.5, seed=3, rank=12)
        assert first.adapter.digest == again.adapter.digest, method
        record = first.record()
        assert record["density"] == 0.5 and record["rank"] == 12
        assert ("seed" in record) == method.startswith("dare")
    module = "model.layers.0.self_attn.v_proj"                # both adapt it
    terms = [Term(x.modules[module].b, x.modules[module].a, x.modules[module].scale) for x in (a, b)]
    summed = pruned(terms, "magnitude_prune", 0.25, None)      # each term keeps its largest quarter
    assert 0 < (summed != 0).float().mean() <= 0.5
    elected = pruned(terms, "ties", 1.0, None)                  # TIES: each entry the mean of the terms of its sign
    full = torch.stack([t.full() for t in terms])
    agree = full.sign() == torch.where(full.sum(0) >= 0, 1.0, -1.0).double()
    assert torch.allclose(elected, (full * agree).sum(0) / agree.sum(0).clamp(min=1))

def test_composed_adapters_load_in_peft_and_match(tiny, three, tmp_path):
    peft = pytest.importorskip("peft")
    model, inputs = tiny
    mix = lorakit.compose(dict(zip("abc", three)), [0.7, -0.3, 1.5])
    mix.save(tmp_path / "mix")
    config = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert isinstance(config["r"], int) and config["lora_alpha"] == config["r"]       # one r, one alpha (vLLM)
    assert not config.get("rank_pattern") and not config.get("alpha_pattern") and not config["use_dora"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "mix")).eval()
    assert relative_error(output_of(theirs, inputs), output_of(reference(model, list(zip(three, [0.7, -0.3, 1.5]))),
                                                               inputs)) <= 1e-5


def test_what_cannot_be_added_exactly_is_refused_with_what_to_do(tiny, three, tmp_path):
    model, _ = tiny
    a, b, _ = three
    dora = trained(model, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]), 7, tmp_path / "d")
    with pytest.raises(ConfigError, match="DoRA.*lorakit merge"):
        lorakit.compose([a, dora], [0.5, 0.5])
    with pytest.raises(ConfigError, match="takes no rank.*svd"):
        lorakit.compose([a, b], method="cat", rank=4)
    with pytest.raises(ConfigError, match="needs a density"):
        lorakit.compose([a, b], method="ties")
    with pytest.raises(ConfigError, match="not a finite number"):
        lorakit.compose([a, b], [1.0, float("nan")])
    with pytest.raises(ConfigError, match="not one of"):
        lorakit.compose([a, b], method="average")
    other, _ = llama(seed=9)                                                      # another base model
    stranger = trained(other, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), 8, tmp_path / "stranger")
    with pytest.raises(ConfigError, match="different base models.*q_proj"):
        lorakit.compose([a, stranger])
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 40, bias=False)   # another shape, no record
    wide = trained(other, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), 8, tmp_path / "wide")
    with pytest.raises(ConfigError, match="do not fit the same model"):
        lorakit.compose([a, Adapter.from_tensors(wide.config, wide.tensors)])

def test_the_cli_writes_a_peft_folder_and_a_card_that_records_how(three, tmp_path):
    a, b, _ = three
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "lorakit.cli", "compose", "--adapter", f"a={a.source}:0.7",
                           "--adapter", f"b={b.source}:-0.3", "--method", "dare_ties", "--density", "0.5",
                           "--seed", "11", "--rank", "8", "--output", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    card = json.loads((out / "lorakit_card.json").read_text())
    record = card["composition"]
    assert record["method"] == "dare_ties" and record["density"] == 0.5 and record["seed"] == 11
    assert [i["weight"] for i in record["inputs"]] == [0.7, -0.3]
    assert record["inputs"][0]["digest"] == a.digest
    assert Adapter.read(out).digest == record["digest"] == card["adapter"]["digest"]
    assert "kept" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "lorakit.cli", "compose", "--adapter", f"a={a.source}:heavy",
                          "--output", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "heavy" in bad.stderr and "Traceback" not in bad.stderr
