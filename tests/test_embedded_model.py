"""The embedded base model: a real Hugging Face model folder inside the package, loadable like any other."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.errors import ModelError
from lorakit.models import EMBEDDED_MODEL, load_tokenizer, resolve_model_path


def test_it_loads_through_transformers_auto_classes_and_fits_the_size_budget():
    files = {p.name for p in EMBEDDED_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert sum(p.stat().st_size for p in EMBEDDED_MODEL.iterdir()) <= 40 * 2**20
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    assert model.config.model_type == "llama"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id       # the pad-equals-EOS trap, avoided at the source
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer("Sort 12, 7")["input_ids"]) == "Sort 12, 7"   # digits round-trip


def test_its_pretraining_is_recorded():
    record = json.loads((EMBEDDED_MODEL / "pretraining.json").read_text())
    assert record["corpus"]["train_files"] and record["corpus"]["held_out_files"]
    assert not set(record["corpus"]["train_files"]) & set(record["corpus"]["held_out_files"])
    assert record["seconds"] > 0 and 1 < record["held_out_perplexity"] < 1000
    assert record["command"].startswith("python scripts/pretrain_embedded.py")


def test_model_paths_resolve_or_fail_clearly(tmp_path):
    assert resolve_model_path(None) == str(EMBEDDED_MODEL)
    assert resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"      # a hub id is passed through
    with pytest.raises(ModelError, match="not found"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    assert load_tokenizer(None).pad_token is not None
