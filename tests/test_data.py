"""The data pipeline: reading every format, loss masks for every row shape, and packed batches that give
each sample exactly the logits it has alone."""

import csv
import json

import pytest
import torch

from lorakit.data import (IGNORE, BatchPlan, Example, Row, collate_rows, generation_prompt, read_rows,
                          row_format, tokenize_row, tokenize_rows)
from lorakit.data.chat import generation_prompt_ids
from lorakit.errors import DataError
from tiny_models import llama, tiny_chat_tokenizer

RECORDS = [{"prompt": "What is two plus two?", "completion": " four"},
           {"prompt": "Translate: hello", "completion": " bonjour"}]
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "Translate: hello"},
        {"role": "assistant", "content": "bonjour"}]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


def labelled_text(tokenizer, example: Example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])


# ---- reading -------------------------------------------------------------------------------------------

def write_jsonl(path):
    path = path / "train.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n")
    return path, [f"{path}:1", f"{path}:3"]


def write_json(path):
    path = path / "train.json"
    path.write_text(json.dumps(RECORDS))
    return path, [f"{path}:row 1", f"{path}:row 2"]


def write_csv(path):
    path = path / "train.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(RECORDS)
    return path, [f"{path}:line 2", f"{path}:line 3"]


def write_parquet(path):
    import pyarrow
    import pyarrow.parquet
    path = path / "train.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(RECORDS), path)
    return path, [f"{path}:row 1", f"{path}:row 2"]


def write_dataset(path):
    import datasets
    path = path / "saved"
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(path))
    return path, [f"{path}:row 1", f"{path}:row 2"]


def write_dataset_dict(path):
    import datasets
    path = path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS),
                          "test": datasets.Dataset.from_list(RECORDS[:1])}).save_to_disk(str(path))
    return path, [f"{path}:row 1", f"{path}:row 2"]


@pytest.mark.parametrize("write", [write_jsonl, write_json, write_csv, write_parquet, write_dataset,
                                   write_dataset_dict])
def test_every_format_reads_the_same_rows_with_their_sources(tmp_path, write):
    path, sources = write(tmp_path)
    rows = read_rows(path)
    assert [row.data for row in rows] == RECORDS
    assert [row.source for row in rows] == sources


@pytest.mark.parametrize("name, text, expected", [
    ("bad.jsonl", '{"text": "a"}\n{"text": "b",\n', "bad.jsonl:2: not valid JSON"),
    ("list.jsonl", '{"text": "a"}\n["text"]\n', "list.jsonl:2: the line holds a list, not a JSON object"),
    ("bad.json", '[{"text": "a"},\n {"text": }]', "bad.json:2: not valid JSON"),
    ("object.json", '{"text": "a"}', "must hold a list of objects"),
    ("rows.json", '[{"text": "a"}, "b"]', "rows.json:row 2: the row is a string"),
    ("ragged.csv", 'prompt,completion\na,b\nc,d,e\n', "ragged.csv:line 3: the row has a different number"),
    ("empty.jsonl", "\n\n", "empty.jsonl holds no rows"),
    ("header.csv", "prompt,completion\n", "header.csv holds no rows"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', "not UTF-8"),
    ("data.txt", "hello", "unknown data format '.txt'"),
])
def test_bad_files_name_the_file_and_line(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DataError, match=expected.replace("[", r"\[").replace(".", r"\.")):
        read_rows(path)


def test_missing_file_and_folders_that_are_not_datasets(tmp_path):
    with pytest.raises(DataError, match="not found: .*nope.jsonl"):
        read_rows(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="not a dataset saved with"):
        read_rows(tmp_path)


def test_dataset_dict_without_train_lists_its_splits(tmp_path):
    import datasets
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(RECORDS),
                          "test": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match="no 'train' split .*test, validation"):
        read_rows(tmp_path / "d")


# ---- row shapes and loss masks -------------------------------------------------------------------------

def test_row_format_and_rows_of_no_known_shape():
    assert row_format(Row({"prompt": "a", "completion": "b"}, "f:1")) == "prompt_completion"
    assert row_format(Row({"messages": CHAT}, "f:1")) == "messages"
    assert row_format(Row({"text": "a", "prompt": None}, "f:1")) == "text"   # a parquet null is no key
    with pytest.raises(DataError, match=r"f:7: .*keys \(answer, question\).*prompt.*messages.*text"):
        row_format(Row({"question": "a", "answer": "b"}, "f:7"))
    with pytest.raises(DataError, match="has 'prompt' but not its partner"):
        row_format(Row({"prompt": "a"}, "f:1"))


def test_prompt_completion_labels_the_completion_and_eos_even_when_pad_is_eos():
    tokenizer = tiny_chat_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token                 # the pad-equals-EOS trap
    example, truncated = tokenize_row(Row(RECORDS[0], "f:1"), tokenizer, max_length=64)
    prompt = tokenizer("What is two plus two?")["input_ids"]
    assert not truncated and example.input_ids[:len(prompt)] == prompt
    assert example.labels[:len(prompt)] == [IGNORE] * len(prompt)
    assert example.input_ids[-1] == example.labels[-1] == tokenizer.eos_token_id
    assert labelled_text(tokenizer, example) == " four<|endoftext|>"


def test_a_tokenizer_bos_starts_the_prompt_and_is_never_a_label():
    tokenizer = tiny_chat_tokenizer(add_bos=True)
    example, _ = tokenize_row(Row({"prompt": "", "completion": "four"}, "f:1"), tokenizer, max_length=64)
    assert example.input_ids[0] == tokenizer.eos_token_id and example.labels[0] == IGNORE
    assert labelled_text(tokenizer, example) == "four<|endoftext|>"


def test_text_rows_label_every_token_after_the_first_and_end_with_eos(tokenizer):
    example, _ = tokenize_row(Row({"text": "hello world"}, "f:1"), tokenizer, max_length=64)
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.labels == [IGNORE] + example.input_ids[1:]


def test_chat_labels_only_the_assistant_turns_and_their_end_of_turn(tokenizer):
    example, _ = tokenize_row(Row({"messages": CHAT}, "f:1"), tokenizer, max_length=256)
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert labelled_text(tokenizer, example) == "four<|im_end|>\nbonjour<|im_end|>\n"
    spans = [[]]                                        # consecutive labelled tokens
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            spans[-1].append(token)
        elif spans[-1]:
            spans.append([])
    assert [tokenizer.decode(span) for span in spans if span] == ["four<|im_end|>\n", "bonjour<|im_end|>\n"]


@pytest.mark.parametrize("row", [RECORDS[0], {"messages": CHAT}])
def test_generation_prompt_is_a_prefix_of_the_training_ids(tokenizer, row):
    ids, reference = generation_prompt(Row(row, "f:1"), tokenizer)
    example, _ = tokenize_row(Row(row, "f:1"), tokenizer, max_length=256)
    assert example.input_ids[:len(ids)] == ids
    assert example.labels[len(ids) - 1] == IGNORE and example.labels[len(ids)] != IGNORE   # the reply starts
    if "messages" in row:
        assert reference == "bonjour"
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHAT[:-1], tokenize=False,
                                                                       add_generation_prompt=True)
        assert ids == generation_prompt_ids(tokenizer, CHAT[:-1], "f:1")  # what serving and generate --chat send
    else:
        assert reference == " four" and ids == tokenizer("What is two plus two?")["input_ids"]
    with pytest.raises(DataError, match="f:1: a text row has no prompt"):
        generation_prompt(Row({"text": "hi"}, "f:1"), tokenizer)


@pytest.mark.parametrize("data, expected", [
    ({"prompt": "a", "completion": 4}, "f:1: field 'completion' must be a string, got int"),
    ({"prompt": ["a"], "completion": "b"}, "f:1: field 'prompt' must be a string"),
    ({"prompt": "a", "completion": "  "}, "f:1: field 'completion' is empty"),
    ({"text": 3}, "f:1: field 'text' must be a string"),
    ({"messages": "hi"}, "f:1: field 'messages' must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"f:1: messages\[0\]: role 'bot' is not one of"),
    ({"messages": [{"role": "user", "content": 1}]}, r"f:1: messages\[0\]: field 'content' must be a string"),
    ({"messages": [{"role": "user"}]}, r'messages\[0\] must be an object with "role" and "content"'),
    ({"messages": [{"role": "user", "content": "hi"}]}, "f:1: the conversation has no assistant message"),
])
def test_bad_rows_name_the_source_and_field(tokenizer, data, expected):
    with pytest.raises(DataError, match=expected):
        tokenize_row(Row(data, "f:1"), tokenizer, max_length=64)


def test_tokenizers_without_a_chat_template_or_an_eos_are_refused():
    plain = tiny_chat_tokenizer()
    plain.chat_template = None
    with pytest.raises(DataError, match="f:1: chat rows need a tokenizer with a chat template"):
        tokenize_row(Row({"messages": CHAT}, "f:1"), plain, max_length=64)
    no_eos = tiny_chat_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(DataError, match="f:1: the tokenizer has no end-of-sequence token"):
        tokenize_row(Row(RECORDS[0], "f:1"), no_eos, max_length=64)


def test_a_generation_prompt_needs_a_template_that_takes_the_messages():
    plain = tiny_chat_tokenizer()
    plain.chat_template = None
    with pytest.raises(DataError, match="the model 'm' has no chat template; drop --chat"):
        generation_prompt_ids(plain, CHAT[:2], "the model 'm'", remedy="drop --chat")
    plain.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match=r"the model 'm': the tokenizer's chat template refused the conversation "
                                        r"\(roles must alternate\)"):
        generation_prompt_ids(plain, CHAT[:2], "the model 'm'")


def test_long_rows_are_truncated_or_refused_and_prompt_only_rows_dropped(tokenizer):
    long = Row({"prompt": "What is two plus two?", "completion": " four four four four four four"}, "f:2")
    full, _ = tokenize_row(long, tokenizer, max_length=256)
    cut, truncated = tokenize_row(long, tokenizer, max_length=10)
    assert truncated and cut.input_ids == full.input_ids[:10] and cut.labels == full.labels[:10]
    with pytest.raises(DataError, match=f"f:2: the row is {len(full.input_ids)} tokens, longer than "
                                        "max_length 10. Raise --max-length"):
        tokenize_row(long, tokenizer, max_length=10, on_overflow="refuse")

    prompt_length = len(tokenizer("What is two plus two?")["input_ids"])
    rows = [long, Row({"prompt": "What", "completion": " four"}, "f:3")]
    examples, stats = tokenize_rows(rows, tokenizer, max_length=prompt_length)
    assert [e.source for e in examples] == ["f:3"]
    assert stats == {"examples": 1, "truncated": 1, "dropped": 1, "tokens": len(examples[0].input_ids),
                     "label_tokens": examples[0].label_tokens}
    with pytest.raises(DataError, match="no row keeps a token to learn"):
        tokenize_rows(rows[:1], tokenizer, max_length=prompt_length)


def test_tokenize_rows_counts_tokens_and_labels(tokenizer):
    rows = [Row(RECORDS[0], "f:1"), Row({"messages": CHAT}, "f:2"), Row({"text": "hello"}, "f:3")]
    examples, stats = tokenize_rows(rows, tokenizer, max_length=256)
    assert stats["examples"] == 3 and stats["truncated"] == stats["dropped"] == 0
    assert stats["tokens"] == sum(len(e.input_ids) for e in examples)
    assert stats["label_tokens"] == sum(sum(label != IGNORE for label in e.labels) for e in examples)


# ---- batches and packing -------------------------------------------------------------------------------

def random_examples(lengths, seed=0, vocab=128):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i, length in enumerate(lengths):
        ids = torch.randint(1, vocab, (length,), generator=generator).tolist()
        examples.append(Example(ids, [IGNORE] * (length // 2) + ids[length // 2:], f"row {i}"))
    return examples


def test_batch_plans_are_deterministic_and_use_every_example_once_per_epoch():
    examples = random_examples([3, 9, 4, 7, 2, 12, 5, 8, 6, 1, 10, 11] * 3)
    plan = BatchPlan(examples, batch_size=2, max_length=16, pad_id=0, seed=7)
    torch.manual_seed(123)
    first = plan.epoch(0)
    torch.manual_seed(456)                                   # the global RNG plays no part
    assert BatchPlan(examples, batch_size=2, max_length=16, pad_id=0, seed=7).epoch(0) == first
    assert plan.epoch(1) != first
    for epoch in range(3):
        batches = plan.epoch(epoch)
        indices = [i for batch in batches for row in batch for i in row]
        assert sorted(indices) == list(range(len(examples)))
        assert all(1 <= len(batch) <= 2 for batch in batches)
        assert all(sum(len(examples[i].input_ids) for i in row) <= 16 for batch in batches for row in batch)
    assert len([row for batch in first for row in batch]) < len(examples)        # rows hold several


def test_without_packing_a_row_is_one_example_padded_to_a_few_shapes():
    examples = random_examples([3, 9, 4, 7])
    plan = BatchPlan(examples, batch_size=2, max_length=16, pad_id=0, seed=0, packing=False)
    batches = plan.epoch(0)
    assert all(len(row) == 1 for batch in batches for row in batch)
    batch = plan.collate(batches[0])
    lengths = [len(examples[row[0]].input_ids) for row in batches[0]]
    assert batch.input_ids.shape == (2, 16)        # rounded up to min(64, max_length)
    assert collate_rows([[examples[1]], [examples[0]]], pad_id=0).input_ids.shape == (2, 9)   # no rounding asked
    short = lengths.index(min(lengths))
    assert (batch.input_ids[short, min(lengths):] == 0).all() and (batch.labels[short, min(lengths):] == IGNORE).all()


def test_packed_batches_always_have_the_width_max_length():
    examples = random_examples([3, 9, 4, 7, 2])
    plan = BatchPlan(examples, batch_size=2, max_length=32, pad_id=0, seed=0, packing=True)
    assert {plan.collate(rows).input_ids.shape[1] for rows in plan.epoch(0)} == {32}


def test_collate_lays_samples_end_to_end_and_counts_label_tokens():
    examples = random_examples([5, 3, 6])
    batch = collate_rows([[examples[0], examples[1]], [examples[2]]], pad_id=0)
    assert batch.input_ids.shape == batch.labels.shape == batch.position_ids.shape == (2, 8)
    assert batch.attention_mask.shape == (2, 1, 8, 8)
    assert batch.input_ids[0].tolist() == examples[0].input_ids + examples[1].input_ids
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]]
    assert batch.labels[0, 5] == IGNORE                     # no sample is trained to predict the next one
    assert batch.label_tokens == int((batch.labels[:, 1:] != IGNORE).sum()) == sum(
        sum(label != IGNORE for label in e.labels) for e in examples)
    blocked = batch.attention_mask[0, 0] < 0
    assert blocked[5, 4] and not blocked[5, 5] and blocked[4, 5]   # second sample: not the first, not ahead


def alone_logits(model, example):
    with torch.no_grad():
        return model(torch.tensor([example.input_ids])).logits[0]


def peft_wrapped(model):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("wrap", [None, peft_wrapped], ids=["bare", "peft"])
def test_packed_samples_get_the_logits_they_get_alone(attention, wrap):
    model, _ = llama()
    model.set_attn_implementation(attention)
    model = wrap(model).eval() if wrap else model
    examples = random_examples([5, 3, 7, 4], seed=1)
    batch = collate_rows([[examples[0], examples[1], examples[2]], [examples[3]]], pad_id=0)
    with torch.no_grad():      # the model's default use_cache=True: the mask must hold with a cache too
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                       attention_mask=batch.attention_mask).logits
    starts = [(0, 0), (0, 5), (0, 8), (1, 0)]
    for (row, start), example in zip(starts, examples):
        packed = logits[row, start:start + len(example.input_ids)]
        torch.testing.assert_close(packed, alone_logits(model, example), atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_does_not_change_the_logits_of_real_tokens(attention):
    model, _ = llama()
    model.set_attn_implementation(attention)
    examples = random_examples([9, 2], seed=2)
    plan = BatchPlan(examples, batch_size=2, max_length=16, pad_id=5, seed=0, packing=False)
    batch = plan.collate([[1], [0]])                          # the short one first, padded to 16
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                       attention_mask=batch.attention_mask, use_cache=False).logits
    torch.testing.assert_close(logits[0, :2], alone_logits(model, examples[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, :9], alone_logits(model, examples[0]), atol=1e-5, rtol=0)
