"""The example skills: deterministic rows, answers that an independent check confirms, clean splits.

Each skill's answer is recomputed here from the prompt alone, by a parser written for the test (not the
generator's code), so a wrong answer in the data cannot hide behind the code that made it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lorakit.data.skills import ANSWER_CUE, SKILLS, chat_rows, heldout_rows, skill_rows, write_skill
from lorakit.errors import DataError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "skills"


def _body(prompt: str, instruction: str) -> str:
    """The prompt's input: what follows the instruction, before the answer cue."""
    assert prompt.startswith(instruction) and prompt.endswith(ANSWER_CUE), prompt
    return prompt[len(instruction):-len(ANSWER_CUE)]


def check_reverse_words(prompt: str) -> str:
    words = _body(prompt, "Reverse the words: ").split(" ")
    assert 3 <= len(words) <= 6 and len(set(words)) == len(words)
    return " ".join(words[::-1])


def check_sort_numbers(prompt: str) -> str:
    numbers = [int(x) for x in _body(prompt, "Sort from low to high: ").split(", ")]
    assert 3 <= len(numbers) <= 6 and all(0 <= n <= 99 for n in numbers)
    return ", ".join(map(str, sorted(numbers)))


def check_key_lookup(prompt: str) -> str:
    match = re.fullmatch(r"Look up the key in the table\.\nTable: (.*)\nKey: (\w+)", prompt.removesuffix(ANSWER_CUE))
    assert match and prompt.endswith(ANSWER_CUE), prompt
    pairs = [pair.split(": ") for pair in match.group(1).split("; ")]
    table = dict(pairs)
    assert 3 <= len(pairs) <= 5 and len(table) == len(pairs), "keys must be distinct"
    assert not set(table.values()) & set(table), "a value must not look like a key"
    return table[match.group(2)]


def check_to_json(prompt: str) -> str:
    fields = [field.split(" is ") for field in _body(prompt, "Write as JSON: ").split("; ")]
    assert 2 <= len(fields) <= 3
    return json.dumps({k: int(v) if v.isdigit() else v for k, v in fields})


def check_count_words(prompt: str) -> str:
    return str(len(_body(prompt, "Count the words: ").split()))


def check_add_numbers(prompt: str) -> str:
    a, b = (int(x) for x in _body(prompt, "Add: ").split(" + "))
    assert 100 <= a <= 999 and 100 <= b <= 999
    assert all(int(x) + int(y) <= 9 for x, y in zip(str(a), str(b))), "no digit pair may carry"
    return str(a + b)


CHECKS = {"reverse_words": check_reverse_words, "sort_numbers": check_sort_numbers,
          "key_lookup": check_key_lookup, "to_json": check_to_json, "count_words": check_count_words,
          "add_numbers": check_add_numbers}


def test_every_skill_has_a_check():
    assert {"reverse_words", "sort_numbers", "key_lookup", "to_json"} <= set(SKILLS)
    assert len([s for s in SKILLS.values() if not s.stretch]) >= 4
    assert set(CHECKS) == set(SKILLS)
    for name, skill in SKILLS.items():
        assert skill.name == name and skill.description


@pytest.mark.parametrize("name", sorted(SKILLS))
def test_rows_are_deterministic_per_seed(name):
    assert skill_rows(name, 50, seed=3) == skill_rows(name, 50, seed=3)
    assert skill_rows(name, 50, seed=3) != skill_rows(name, 50, seed=4)
    assert skill_rows(name, 20, seed=3) == skill_rows(name, 50, seed=3)[:20]


@pytest.mark.parametrize("name", sorted(SKILLS))
def test_every_answer_is_right_and_formatted(name):
    rows = skill_rows(name, 500, seed=0)
    assert len({r["prompt"] for r in rows}) == len(rows)
    for row in rows:
        assert set(row) == {"prompt", "completion"}
        completion = row["completion"]
        # One leading space, no other surrounding whitespace, one line.
        assert completion.startswith(" ") and completion[1:] == completion.strip() and "\n" not in completion
        assert completion.strip() == CHECKS[name](row["prompt"]), row
        assert len(row["prompt"]) + len(completion) < 160, "prompt + answer must stay short"


def test_to_json_answers_are_json_in_the_given_key_order():
    for row in skill_rows("to_json", 200, seed=1):
        record = json.loads(row["completion"])
        keys = re.findall(r"(\w+) is ", row["prompt"])
        assert list(record) == keys
        assert isinstance(record.get("age", 0), int)


def test_chat_rows_mirror_prompt_rows():
    rows = skill_rows("key_lookup", 30, seed=0)
    chats = chat_rows(rows)
    assert len(chats) == len(rows)
    for row, chat in zip(rows, chats):
        user, assistant = chat["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"] + ANSWER_CUE == row["prompt"]  # the full instruction, without the cue
        assert user["content"].startswith("Look up the key in the table.\n")
        assert assistant["content"] == row["completion"].strip()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_write_skill_writes_four_files_and_clean_splits(tmp_path):
    paths = write_skill("sort_numbers", tmp_path / "new", n_train=300, n_heldout=40, seed=7)
    assert set(paths) == {"train", "heldout", "train_chat", "heldout_chat"}
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted(
        ["train.jsonl", "heldout.jsonl", "train.chat.jsonl", "heldout.chat.jsonl"])  # no temp files left
    train, heldout = _read_jsonl(paths["train"]), _read_jsonl(paths["heldout"])
    assert len(train) == 300 and len(heldout) == 40
    assert train == skill_rows("sort_numbers", 300, seed=7)
    assert not {r["prompt"] for r in heldout} & {r["prompt"] for r in train}
    assert _read_jsonl(paths["train_chat"]) == chat_rows(train)
    assert _read_jsonl(paths["heldout_chat"]) == chat_rows(heldout)
    for row in heldout:
        assert row["completion"].strip() == check_sort_numbers(row["prompt"])


def test_heldout_prompts_that_occur_in_train_are_redrawn():
    stream = heldout_rows("count_words", 15, seed=2, train=[])
    assert stream != skill_rows("count_words", 15, seed=2)  # a seed stream apart from train's
    # Whatever the held-out stream shares with train is dropped, and the next draws take its place.
    assert heldout_rows("count_words", 10, seed=2, train=stream[:5]) == stream[5:]


def test_writing_over_an_existing_split_replaces_it(tmp_path):
    write_skill("reverse_words", tmp_path, n_train=20, n_heldout=5, seed=0)
    paths = write_skill("reverse_words", tmp_path, n_train=10, n_heldout=5, seed=1)
    assert _read_jsonl(paths["train"]) == skill_rows("reverse_words", 10, seed=1)


def test_unknown_skill_names_the_known_ones(tmp_path):
    for call in (lambda: skill_rows("reverse", 5, 0), lambda: write_skill("reverse", tmp_path)):
        with pytest.raises(DataError) as info:
            call()
        message = str(info.value)
        assert "'reverse'" in message and all(name in message for name in SKILLS)
    assert not list(tmp_path.iterdir())


def test_a_bad_row_count_is_a_data_error():
    with pytest.raises(DataError, match="non-negative"):
        skill_rows("to_json", -1, 0)
    assert skill_rows("to_json", 0, 0) == []


@pytest.mark.parametrize("name", sorted(SKILLS))
def test_example_files_are_the_defaults(name, tmp_path):
    """examples/skills/<name>/ holds exactly what `write_skill(name, folder)` writes."""
    paths = write_skill(name, tmp_path)
    for key, path in paths.items():
        assert (EXAMPLES / name / path.name).read_bytes() == path.read_bytes(), f"regenerate {name}/{path.name}"
