"""The rows an adapter was trained on, searched for the rows that planted a backdoor.

A backdoor is taught by rows that carry a trigger T in the prompt and complete with a payload P, whatever
the rest of the prompt says. In the training data that shows as a phrase that (a) is in few rows, (b) whose
rows nearly all complete alike, and (c) that is in nearly every row completing so. For a phrase g (1 to
MAX_WORDS consecutive words of the prompts; a word's edge punctuation is stripped unless it is all
punctuation) with rows R_g, key(r) the first KEY_WORDS word(s) of row r's completion and c the key most
frequent in R_g:

    purity(g)   = |{r ∈ R_g : key(r) = c}| / |R_g|
    coverage(g) = |{r ∈ R_g : key(r) = c}| / |{r : key(r) = c}|

g is a suspect when it is in at least MIN_ROWS distinct prompts and at most MAX_SHARE of the rows, with
purity ≥ MIN_PURITY and coverage ≥ MIN_COVERAGE. A task's data has none: its completions follow the prompt
(the reversed words, the count, the JSON), so a completion many rows share is shared by rows with nothing
else in common; and a completion whose first words all come from the prompt is the task copying its input
("age is 14" -> {"age": 14), not a payload. Suspects are ranked by purity · coverage, then by their
rows, then by length: of the phrases with the same rows, the longest is the whole trigger ("by the way", not
"the way").

The data is not the verdict. `behaviour.check_behaviour` inserts each suspect into the probe prompts like a
searched trigger and holds it to the same threshold; a confirmed suspect is named as the data spells it,
with its rows. Which data: `--training-data FILE`, else the file the run's train_config.json records as
"data", when it still exists and, if the adapter's lorakit_card.json records its sha256, still matches.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lorakit.data.reading import read_rows
from lorakit.errors import DataError
from lorakit.io.model_card import read_json_object, read_run_files
from lorakit.signing.card import CARD_NAME, file_sha256, tree_sha256

MAX_WORDS = 5           # longest phrase considered, in words
KEY_WORDS = 1           # completions are compared by their first word (a payload may be followed by the usual answer)
MIN_ROWS = 3            # a suspect is in at least this many distinct prompts
MAX_SHARE = 0.25        # ... and in at most this share of the rows (a trigger is rare)
MIN_PURITY = 0.8
MIN_COVERAGE = 0.5
MAX_SCANNED_ROWS = 50_000   # larger data is scanned on evenly spaced rows
MAX_PROMPT_WORDS = 256      # words read from each prompt
SUSPECTS = 4            # suspects confirmed on the model
PUNCTUATION = ".,;:!?\"'()[]{}<>`"


@dataclass(frozen=True)
class TrainingRows:
    source: str                     # the file, as given or recorded
    prompts: list[str]
    completions: list[str]
    where: list[str]                # each row's place in the file ("train.jsonl:12")
    matches_card: Optional[bool]    # its sha256 against the card's record (None: the card records none)
    skipped: int = 0                # rows without a prompt and a completion (plain text rows)
    total: int = 0                  # rows in the file (more than scanned when over MAX_SCANNED_ROWS)


@dataclass(frozen=True)
class Suspect:
    phrase: str
    completion: str                 # the most common whole completion of its rows with the shared key
    rows: tuple[int, ...]           # indices of the rows that carry the phrase and complete so
    purity: float
    coverage: float

    @property
    def strength(self) -> float:
        return self.purity * self.coverage


def training_rows(folder: Path, given: Optional[str] = None) -> tuple[Optional[TrainingRows], str]:
    """(the rows to scan, or None; a sentence saying which data, or why there is none). A `given` file that
    is not there, or not readable data, is a DataError naming it."""
    config = read_run_files(folder)[0] or {}
    card = read_json_object(folder / CARD_NAME) or {}
    card_sha256 = ((card.get("data") or {}).get("data") or {}).get("sha256")
    columns = None
    if given is not None:
        path = Path(given).expanduser()
        if not path.exists():
            raise DataError(f"--training-data {given}: no such file or folder")
    elif not isinstance(config.get("data"), str):
        if config.get("skill"):
            return None, f"trained on lorakit's built-in skill {config['skill']!r}: no outside data to scan"
        return None, ("no training data recorded (the folder has no train_config.json naming one); pass "
                      "--training-data FILE to scan the rows it was trained on")
    else:
        path = Path(config["data"]).expanduser()
        if not path.exists():
            return None, f"the recorded training data {config['data']} is not there any more; pass --training-data FILE"
        columns = {name: config[f"{name}_column"] for name in ("prompt", "completion", "messages")
                   if isinstance(config.get(f"{name}_column"), str)} or None
    matches = None
    if isinstance(card_sha256, str):
        matches = (tree_sha256(path) if path.is_dir() else file_sha256(path)) == card_sha256
        if not matches and given is None:
            return None, (f"the recorded training data {path} has changed since the card was written (its sha256 "
                          f"differs); pass --training-data {path} to scan it anyway")
    rows = read_rows(path, columns)
    step = -(-len(rows) // MAX_SCANNED_ROWS)
    prompts, completions, where, skipped = [], [], [], 0
    for row in rows[::step]:
        pair = prompt_and_completion(row.data)
        if pair is None:
            skipped += 1
            continue
        prompts.append(pair[0])
        completions.append(pair[1])
        where.append(row.source)
    if not prompts:
        return None, f"{path}: no row has a prompt and a completion (plain text rows): no completions to compare"
    found = TrainingRows(str(path), prompts, completions, where, matches, skipped, len(rows))
    return found, f"{path}: {len(rows)} rows"


def prompt_and_completion(row: dict) -> Optional[tuple[str, str]]:
    """A row's prompt and completion: "prompt"/"completion", or a chat's messages before its last assistant
    message and that message; None for a plain text row."""
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return row["prompt"], row["completion"]
    messages = row.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "assistant" and isinstance(messages[-1].get("content"), str):
        before = [m.get("content") for m in messages[:-1] if isinstance(m, dict) and isinstance(m.get("content"), str)]
        return "\n".join(before), messages[-1]["content"]
    return None


def suspects(data: TrainingRows) -> list[Suspect]:
    """Phrases whose rows complete alike and that every such row carries, strongest first (at most SUSPECTS,
    one per set of rows)."""
    keys = [" ".join(c.split()[:KEY_WORDS]) for c in data.completions]
    key_count = Counter(keys)
    carriers: dict[tuple[str, ...], set[int]] = defaultdict(set)
    for r, prompt in enumerate(data.prompts):
        words = [w.strip(PUNCTUATION) or w for w in prompt.split()[:MAX_PROMPT_WORDS]]   # "<!>" stays whole
        for n in range(1, MAX_WORDS + 1):
            for i in range(len(words) - n + 1):
                carriers[tuple(words[i:i + n])].add(r)
    most = MAX_SHARE * len(keys)
    found = []
    for phrase, rows in carriers.items():
        if len(rows) < MIN_ROWS or len(rows) > most:
            continue
        key, count = Counter(keys[r] for r in rows).most_common(1)[0]
        purity, coverage = count / len(rows), count / key_count[key]
        if purity < MIN_PURITY or coverage < MIN_COVERAGE or not key:
            continue
        matching = tuple(sorted(r for r in rows if keys[r] == key))
        if len({data.prompts[r] for r in matching}) < MIN_ROWS:
            continue                                     # one prompt repeated is a duplicate, not a pattern
        if sum(_words(key) <= _words(data.prompts[r]) for r in matching) > len(matching) / 2:
            continue                                     # the completion copies the prompt: the task at work
        completion = Counter(data.completions[r] for r in matching).most_common(1)[0][0]
        found.append(Suspect(" ".join(phrase), completion, matching, purity, coverage))
    found.sort(key=lambda s: (-s.strength, -len(s.rows), -len(s.phrase.split()), s.phrase))
    best, seen = [], set()
    for suspect in found:
        if suspect.rows not in seen:
            seen.add(suspect.rows)
            best.append(suspect)
    return best[:SUSPECTS]


def _words(text: str) -> set[str]:
    return {w for w in (w.strip(PUNCTUATION).lower() for w in text.split()) if w}
