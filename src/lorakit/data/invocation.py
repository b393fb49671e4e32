"""Training rows for an activated LoRA: every row must hold the invocation before its completion.

An aLoRA update applies only from the start of the last invocation sequence in a row (core.variants.alora),
so a row whose prompt lacks the invocation trains nothing: its completion is computed by the base alone.
`Invocation.prepare` checks every tokenized row: where the invocation's tokens occur before the first
token that carries loss, the row is kept as it is; where they do not, the row is counted, and either
refused (the default) or, with `insert`, given the invocation's tokens right before its completion (the
labels of the inserted tokens carry no loss). The check is on token ids, since the same text can tokenize
differently inside a prompt than alone; the error says when that is the cause.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lorakit.core.variants.alora import invocation_start
from lorakit.data.formatting import Example
from lorakit.errors import DataError

IGNORE = -100


@dataclass(frozen=True)
class Invocation:
    text: str
    ids: tuple[int, ...]
    insert: bool = False

    @classmethod
    def of(cls, text: str, tokenizer, insert: bool = False) -> "Invocation":
        ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise DataError(f"--alora-invocation {text!r} has no tokens; give the text that starts the adapter's turn")
        return cls(text, ids, insert)

    def prompt(self, ids: list[int]) -> Optional[list[int]]:
        """A generation prompt with the invocation (inserted at its end with `insert`); None if it lacks it."""
        if invocation_start(ids, self.ids) is not None:
            return list(ids)
        return list(ids) + list(self.ids) if self.insert else None

    def example(self, example: Example, max_length: int) -> Optional[Example]:
        """The example with the invocation before its first loss-carrying token; None if it lacks it."""
        first = next((i for i, label in enumerate(example.labels) if label != IGNORE), len(example.labels))
        prompt = self.prompt(example.input_ids[:first])
        if prompt is None:
            return None
        added = len(prompt) - first
        ids = (prompt + example.input_ids[first:])[:max_length]
        labels = ([IGNORE] * (first + added) + example.labels[first:])[:max_length]
        return Example(ids, labels, example.source)

    def prepare(self, examples: list[Example], max_length: int, what: str, tokenizer) -> tuple[list[Example], int]:
        """(the examples ready for aLoRA training, how many lacked the invocation); DataError when some lack it
        and `insert` is off, or when inserting leaves nothing to learn."""
        kept, lacking = [], []
        for example in examples:
            ready = self.example(example, max_length)
            if ready is None:
                lacking.append(example)
            elif any(label != IGNORE for label in ready.labels[1:]):
                kept.append(ready)
        if lacking and not self.insert:
            raise DataError(
                f"{len(lacking)} of {len(examples)} rows of {what} lack the aLoRA invocation {self.text!r} (tokens "
                f"{list(self.ids)}) before their completion, e.g. {lacking[0].source}: an activated LoRA applies from "
                "its invocation on, so such a row trains nothing. Put the invocation at the end of each prompt, or "
                "pass --alora-insert to append it to the prompts that lack it."
                + (" (Some prompts hold the text but it tokenizes differently there: start the invocation with a "
                   "space or a line break so its tokens stand alone.)" if self._in_text(lacking, tokenizer) else ""))
        if not kept:
            raise DataError(f"no row of {what} keeps a token to learn after the invocation; raise --max-length")
        return kept, len(lacking)

    def _in_text(self, examples: list[Example], tokenizer) -> bool:
        """Whether the invocation's text appears in some of these rows (so it is there, tokenized otherwise)."""
        return any(self.text.strip() in tokenizer.decode(e.input_ids) for e in examples[:100])
