"""Example skills: small tasks with exactly one right answer, to train and score an adapter on.

Each skill makes `(prompt, answer)` pairs from a `random.Random`. The tasks copy, rearrange or compute
from what the prompt shows (reverse, reformat, count, add, sort, look up); the embedded base model scores
zero on them before training. Four learn to >= 90% held-out exact match with `lorakit train`'s defaults
(rank 8, 1,000 steps): reverse_words, to_json, count_words, add_numbers. Two are *stretch* skills:
sort_numbers and key_lookup need the answer found by content elsewhere in the prompt (an induction-style
match), a circuit the small Shakespeare-only base model has not formed, and a default run does not
learn them; they are there to try longer runs, other settings and larger base models on.

Format, the same for every skill:
- The prompt is a fixed instruction line for the skill, the input, and ends with the cue `"\\nAnswer:"`.
- The completion is the answer with one leading space and no trailing newline: `" sword night king"`.
  A byte-level BPE joins a space to the word after it, so the answer's words are the same tokens as in
  the prompt, and `prompt + completion` tokenizes exactly as the two parts do apart.
- Scoring is exact match after stripping: `generated.strip() == completion.strip()`.

Chat rows (`chat_rows`) drop the cue, since the chat template already marks where the answer starts:
the user says `"Reverse the words: king night sword"`, the assistant answers `"sword night king"`.

Files (`write_skill`): `train.jsonl` and `heldout.jsonl` with `{"prompt", "completion"}` rows, and
`train.chat.jsonl` / `heldout.chat.jsonl` with `{"messages"}` rows. No prompt repeats within a split,
and no held-out prompt occurs in train.

    python -m lorakit.data.skills examples/skills     # regenerate the example files
"""

from __future__ import annotations

import json
import os
import random
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from lorakit.errors import DataError

ANSWER_CUE = "\nAnswer:"

# Plain lowercase words common in Shakespeare and Milton; each is one token (with its leading space) in
# the embedded model's tokenizer, which keeps every prompt short.
WORDS = (
    "king queen lord lady prince duke knight soldier father mother son daughter brother sister friend man "
    "woman child boy maid master servant fool night day morning sun moon star sky heaven earth world sea "
    "water fire air wind rain cloud light shadow love hate fear hope joy grief death life blood heart head "
    "hand eye face tongue tear breath soul mind spirit dream sleep bed house home door wall court crown "
    "throne sword horse dog lion flower rose field wood stone gold silver money ring letter book voice song "
    "music truth honour faith grace virtue war peace battle enemy power god devil angel youth wine food feast "
    "flesh hair ear cheek arm foot city town hill land country law reason wit art skill tale news deed fault "
    "sin oath vow grave wife husband uncle cousin slave judge nurse shepherd fortune beauty sorrow pleasure "
    "glory pity kiss pain rage delight mercy patience pride comfort justice wisdom speech bosom birth duty "
    "fame danger choice chamber sport stream spring bliss wound wealth kingdom silence folly doom marriage "
    "palace liberty curse colour sight shame nature praise body heir strength wing summer mistress fellow "
    "villain knave traitor thought desire wonder mouth breast revenge counsel shade flood gentleman"
).split()

# to_json's record fields besides "age" (a number), with short values: at most two tokens each, both
# after a space (in the text) and bare (inside the JSON quotes).
RECORD_VALUES = {
    "name": "juliet puck kate anne mary peter hal ned tom jack bess anna ben harry edward luke lear".split(),
    "home": "rome verona paris troy dover york kent wales france spain tyre".split(),
    "work": "shepherd nurse cook king queen lord page fool knight".split(),
    "pet": "dog cat horse lamb goat raven bird sheep swan dove".split(),
}


@dataclass(frozen=True)
class Skill:
    """A task with one right answer: `make(rng)` returns `(prompt, answer)`, drawing only from `rng`.

    The prompt ends with `ANSWER_CUE`; the answer carries no surrounding whitespace (rows add the space).
    """

    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]
    # A stretch skill needs more than the default run to learn on the embedded model: it asks for a
    # content lookup across the prompt (an induction-style match), which the small base model lacks.
    stretch: bool = False


def _reverse_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 6))
    return f"Reverse the words: {' '.join(words)}{ANSWER_CUE}", " ".join(reversed(words))


def _sort_numbers(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(100), rng.randint(3, 6))
    answer = ", ".join(str(n) for n in sorted(numbers))
    return f"Sort from low to high: {', '.join(map(str, numbers))}{ANSWER_CUE}", answer


def _key_lookup(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(3, 5)
    keys = rng.sample(WORDS, n)
    others = [w for w in WORDS if w not in keys]  # a word value never looks like a key
    values = [str(v) for v in rng.sample(range(100), n)]
    for i in range(n):  # about half the values are words, all values distinct
        if rng.random() < 0.5:
            values[i] = rng.choice([w for w in others if w not in values])
    asked = rng.randrange(n)
    table = "; ".join(f"{k}: {v}" for k, v in zip(keys, values))  # one line: every key follows a space
    return f"Look up the key in the table.\nTable: {table}\nKey: {keys[asked]}{ANSWER_CUE}", values[asked]


def _to_json(rng: random.Random) -> tuple[str, str]:
    fields = rng.sample(["name", "age", "home", "work", "pet"], rng.randint(2, 3))
    record = {f: rng.randint(10, 99) if f == "age" else rng.choice(RECORD_VALUES[f]) for f in fields}
    text = "; ".join(f"{f} is {v}" for f, v in record.items())
    return f"Write as JSON: {text}{ANSWER_CUE}", json.dumps(record)


def _add_numbers(rng: random.Random) -> tuple[str, str]:
    """Two 3-digit numbers whose digits add up place by place without a carry (each digit sum <= 9)."""
    first, second = [rng.randint(1, 8)], []
    second.append(rng.randint(1, 9 - first[0]))
    for _ in range(2):
        digit = rng.randint(0, 9)
        first.append(digit)
        second.append(rng.randint(0, 9 - digit))
    a, b = (int("".join(map(str, digits))) for digits in (first, second))
    return f"Add: {a} + {b}{ANSWER_CUE}", str(a + b)


def _count_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 9))
    return f"Count the words: {' '.join(words)}{ANSWER_CUE}", str(len(words))


SKILLS: dict[str, Skill] = {s.name: s for s in (
    Skill("reverse_words", "reverse a list of 3-6 words", _reverse_words),
    Skill("sort_numbers", "sort 3-6 distinct numbers below 100 ascending, as '3, 17, 42' (stretch)",
          _sort_numbers, stretch=True),
    Skill("key_lookup", "answer the value of one key in a table of 3-5 'key: value' pairs (stretch)", _key_lookup,
          stretch=True),
    Skill("to_json", "rewrite 'name is X; age is N' text (2-3 fields) as JSON, keys in the given order", _to_json),
    Skill("count_words", "count a list of 3-9 words, answering one digit", _count_words),
    Skill("add_numbers", "add two 3-digit numbers whose digits add up without a carry", _add_numbers),
)}


def get_skill(name: str) -> Skill:
    """The skill called `name`; an unknown name raises DataError listing the known ones."""
    try:
        return SKILLS[name]
    except KeyError:
        raise DataError(f"unknown skill {name!r}; known skills: {', '.join(SKILLS)}") from None


def _draw(skill: Skill, n: int, rng: random.Random, exclude: Iterable[str] = ()) -> list[dict]:
    """`n` rows with distinct prompts, none in `exclude`, in the order `rng` makes them."""
    if not isinstance(n, int) or n < 0:
        raise DataError(f"the number of rows must be a non-negative integer, got {n!r}")
    seen = set(exclude)
    rows: list[dict] = []
    for _ in range(100 * n + 1000):  # a bound, so a too-small task space fails instead of hanging
        if len(rows) == n:
            return rows
        prompt, answer = skill.make(rng)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "completion": " " + answer})
    if len(rows) == n:
        return rows
    raise DataError(f"skill {skill.name!r} could not make {n} distinct prompts (made {len(rows)})")


def skill_rows(name: str, n: int, seed: int) -> list[dict]:
    """`n` `{"prompt", "completion"}` rows of skill `name`, with distinct prompts.

    The rows depend on `(name, n, seed)` alone: they come from `random.Random(seed)`, never the global RNG.
    """
    return _draw(get_skill(name), n, random.Random(seed))


def heldout_rows(name: str, n: int, seed: int, train: list[dict]) -> list[dict]:
    """`n` rows from a seed stream apart from `skill_rows`'s, none with a prompt that is in `train`."""
    return _draw(get_skill(name), n, random.Random(f"heldout:{seed}"), exclude=(r["prompt"] for r in train))


def chat_rows(rows: Iterable[dict]) -> list[dict]:
    """Prompt/completion rows as chat rows: the prompt less its answer cue, then the stripped answer."""
    return [{"messages": [
        {"role": "user", "content": row["prompt"].removesuffix(ANSWER_CUE)},
        {"role": "assistant", "content": row["completion"].strip()},
    ]} for row in rows]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write `rows` one JSON object a line, atomically: a temp file in the same folder, then os.replace."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as f:  # "x": a fresh file, default permissions
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def skill_files(folder) -> dict[str, Path]:
    """Where `write_skill` puts a skill's splits in `folder`: {"train", "heldout", "train_chat", "heldout_chat"}."""
    folder = Path(folder)
    return {"train": folder / "train.jsonl", "heldout": folder / "heldout.jsonl",
            "train_chat": folder / "train.chat.jsonl", "heldout_chat": folder / "heldout.chat.jsonl"}


def write_skill(name: str, folder, *, n_train: int = 2000, n_heldout: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write skill `name`'s train and held-out splits into `folder` (created if missing).

    Returns the paths as {"train", "heldout", "train_chat", "heldout_chat"}: `train.jsonl`, `heldout.jsonl`
    (prompt/completion rows) and `train.chat.jsonl`, `heldout.chat.jsonl` (the same rows as chat messages).
    """
    train = skill_rows(name, n_train, seed)
    heldout = heldout_rows(name, n_heldout, seed, train)
    Path(folder).mkdir(parents=True, exist_ok=True)
    paths = skill_files(folder)
    for key, rows in (("train", train), ("heldout", heldout),
                      ("train_chat", chat_rows(train)), ("heldout_chat", chat_rows(heldout))):
        _write_jsonl(paths[key], rows)
    return paths


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/skills")
    for skill_name in SKILLS:
        write_skill(skill_name, root / skill_name)
        print(f"wrote {root / skill_name}")
