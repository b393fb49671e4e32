"""Turn rows into token ids and loss labels, for training and for exact-match prompts.

Three row shapes are accepted (a key whose value is null counts as absent; checked in this order):
  messages            {"messages": [{"role", "content"}, ...]}  loss on assistant turns (see chat.py)
  prompt_completion   {"prompt": str, "completion": str}         loss on completion + EOS
  text                {"text": str}                               loss on every token + EOS

A row becomes consecutive pieces (ids, carries_loss); an Example concatenates them, labels = the ids of
loss-carrying pieces and -100 elsewhere. Labels are built from piece positions, never by comparing ids to
the pad or EOS id, so a tokenizer whose pad token is its EOS still learns to emit EOS. Labels are not
shifted (labels[t] is the token at t; the loss shifts), and labels[0] is always -100: no position precedes
it to predict it, and in a packed row the previous sample's last token must not be trained to predict it.

`generation_prompt` takes the pieces before the last loss-carrying one, so its ids are exactly a prefix of
the training ids (before any truncation).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.data.chat import chat_segments
from lorakit.data.reading import Row
from lorakit.errors import DataError

IGNORE = -100
OVERFLOW = ("truncate", "refuse")
SHAPES = ('{"prompt": ..., "completion": ...}', '{"messages": [{"role": ..., "content": ...}, ...]}',
          '{"text": ...}')


@dataclass
class Example:
    """One tokenized row: input_ids and labels of the same length (-100: no loss), and its source."""
    input_ids: list[int]
    labels: list[int]
    source: str

    @property
    def label_tokens(self) -> int:
        """Positions that carry loss (labels[0] never does, so this is also the count after the shift)."""
        return sum(label != IGNORE for label in self.labels)


def row_format(row: Row) -> str:
    """"messages", "prompt_completion" or "text", from the row's keys; DataError for anything else."""
    present = sorted(key for key, value in row.data.items() if value is not None)
    if "messages" in present:
        return "messages"
    if "prompt" in present and "completion" in present:
        return "prompt_completion"
    if "text" in present:
        return "text"
    hint = ""
    if ("prompt" in present) != ("completion" in present):
        hint = f" It has '{'prompt' if 'prompt' in present else 'completion'}' but not its partner."
    raise DataError(f"{row.source}: cannot tell the row's shape from its keys ({', '.join(present) or 'none'})."
                    f"{hint} Write each row as one of: {'; '.join(SHAPES)}.")


def tokenize_row(row: Row, tokenizer, max_length: int, on_overflow: str = "truncate") -> tuple[Example, bool]:
    """The row as an Example of at most `max_length` tokens, and whether it was truncated.

    on_overflow="truncate" keeps the first `max_length` tokens; "refuse" raises DataError for a longer row.
    """
    _check_limits(max_length, on_overflow)
    ids, labels = [], []
    for piece, carries_loss in _pieces(row, tokenizer):
        ids += piece
        labels += piece if carries_loss else [IGNORE] * len(piece)
    labels[0] = IGNORE
    if len(ids) <= max_length:
        return Example(ids, labels, row.source), False
    if on_overflow == "refuse":
        raise DataError(f"{row.source}: the row is {len(ids)} tokens, longer than max_length {max_length}. "
                        "Raise --max-length, shorten the row, or let long rows be truncated (on_overflow truncate).")
    return Example(ids[:max_length], labels[:max_length], row.source), True


def tokenize_rows(rows: list[Row], tokenizer, max_length: int,
                  on_overflow: str = "truncate") -> tuple[list[Example], dict]:
    """Examples for `rows`, and stats {"examples", "truncated", "dropped", "tokens", "label_tokens"}.

    A truncated example left with no loss-carrying token (its prompt alone fills max_length) would only
    cost compute: it is dropped and counted in "dropped" (and in "truncated"). "examples", "tokens" and
    "label_tokens" count the kept examples. DataError when no example is left.
    """
    examples, stats = [], {"examples": 0, "truncated": 0, "dropped": 0, "tokens": 0, "label_tokens": 0}
    for row in rows:
        example, truncated = tokenize_row(row, tokenizer, max_length, on_overflow)
        stats["truncated"] += truncated
        if example.label_tokens == 0:
            stats["dropped"] += 1
            continue
        examples.append(example)
        stats["tokens"] += len(example.input_ids)
        stats["label_tokens"] += example.label_tokens
    stats["examples"] = len(examples)
    if not examples:
        raise DataError(f"no row keeps a token to learn within max_length {max_length} (every prompt fills it). "
                        "Raise --max-length or shorten the prompts.")
    return examples, stats


def generation_prompt(row: Row, tokenizer) -> tuple[list[int], str]:
    """(prompt ids to generate from, reference answer) for exact-match scoring.

    prompt_completion: the prompt's ids and the completion. messages: the template's render of the
    conversation before the last assistant message with the generation prompt, and that message's content.
    Text rows have no single right answer: DataError.
    """
    shape = row_format(row)
    if shape == "text":
        raise DataError(f"{row.source}: a text row has no prompt and reference answer for exact-match scoring. "
                        "Use prompt/completion or messages rows for the held-out data.")
    pieces = _pieces(row, tokenizer)
    last_reply = max(i for i, (_, carries_loss) in enumerate(pieces) if carries_loss)
    ids = [token for piece, _ in pieces[:last_reply] for token in piece]
    if shape == "prompt_completion":
        return ids, row.data["completion"]
    return ids, [m for m in row.data["messages"] if m["role"] == "assistant"][-1]["content"]


def _pieces(row: Row, tokenizer) -> list[tuple[list[int], bool]]:
    """The row as consecutive (ids, carries_loss) pieces; only the first may hold the tokenizer's own specials."""
    shape = row_format(row)
    if shape == "messages":
        # The template writes every special token the model expects (a BOS included, where it has one),
        # as transformers' apply_chat_template(tokenize=True) assumes: no segment adds its own.
        segments = chat_segments(row.data["messages"], tokenizer, row.source)
        return [(_encode(tokenizer, text, False), carries_loss) for text, carries_loss in segments]
    eos = _eos_id(tokenizer, row.source)
    if shape == "prompt_completion":
        prompt, completion = _string(row, "prompt"), _string(row, "completion")
        if not completion.strip():
            raise DataError(f"{row.source}: field 'completion' is empty. Give the answer the model should learn.")
        return [(_encode(tokenizer, prompt, True), False), (_encode(tokenizer, completion, False) + [eos], True)]
    text = _string(row, "text")
    if not text.strip():
        raise DataError(f"{row.source}: field 'text' is empty. Remove the row or give it text.")
    return [(_encode(tokenizer, text, True) + [eos], True)]


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _eos_id(tokenizer, source: str) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(f"{source}: the tokenizer has no end-of-sequence token, so the model could not learn "
                        "where an answer ends. Set one (tokenizer.eos_token = ...) or use another tokenizer.")
    return tokenizer.eos_token_id


def _string(row: Row, key: str) -> str:
    value = row.data[key]
    if not isinstance(value, str):
        raise DataError(f"{row.source}: field '{key}' must be a string, got {type(value).__name__} {value!r:.40}.")
    return value


def _check_limits(max_length: int, on_overflow: str) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an integer of at least 2, got {max_length!r}.")
    if on_overflow not in OVERFLOW:
        raise DataError(f"on_overflow must be one of {', '.join(OVERFLOW)}, got {on_overflow!r}.")
