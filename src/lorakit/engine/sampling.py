"""How the next token is chosen: greedy, or sampled with temperature, top-k and top-p, per request.

Every row of a batch carries its own `SamplingParams`; greedy rows take one vectorised argmax, sampled rows
draw from their own seeded `torch.Generator`, so a request's output depends only on its own seed and
never on which other requests share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from lorakit.errors import RequestError


@dataclass
class SamplingParams:
    """One request's decoding settings (OpenAI's names and meanings).

    max_tokens:  tokens to generate at most (the prompt's length plus this must fit the context).
    temperature: 0 is greedy; otherwise logits are divided by it before sampling.
    top_p:       nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.
    top_k:       keep the k most likely tokens (0: all).
    seed:        seeds this request's generator; the same seed gives the same tokens.
    stop:        strings that end the generation; the text is cut before the first one.
    ignore_eos:  keep generating past the end-of-sequence token (benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Sequence[str] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise RequestError(message)

        need(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool) and self.max_tokens >= 1,
             f"max_tokens must be a whole number >= 1, got {self.max_tokens!r}")
        need(isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100,
             f"temperature must be between 0 and 100, got {self.temperature!r}")
        need(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
             f"top_p must be in (0, 1], got {self.top_p!r}")
        need(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= -1,
             f"top_k must be a whole number >= 0 (0 or -1: off), got {self.top_k!r}")
        need(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
             f"seed must be a whole number, got {self.seed!r}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        need(all(isinstance(s, str) and s for s in stop) and len(stop) <= 16,
             "stop must be a non-empty string or a list of at most 16 non-empty strings")
        self.stop = tuple(stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> Optional[torch.Generator]:
        """The request's own random generator (None for greedy decoding)."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        return torch.Generator().manual_seed(seed)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus; logits: (V,)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # the mass before a token already reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def choose_next_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                       generators: Sequence[Optional[torch.Generator]]) -> list[int]:
    """The next token of every row; logits: (B, V) float, one SamplingParams and generator per row."""
    chosen = logits.argmax(-1).tolist()  # greedy rows, one vectorised op
    for row, (p, generator) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        row_logits = filter_top_k_top_p(logits[row].float() / p.temperature, p.top_k, p.top_p)
        probs = row_logits.softmax(-1).cpu()
        chosen[row] = int(torch.multinomial(probs, 1, generator=generator).item())
    return chosen
