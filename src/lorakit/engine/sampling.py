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

# vLLM's _SAMPLING_EPS: dividing logits by a smaller temperature overflows them, so it decodes greedily.
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
# Every decode step scans each running request's stop strings, so their size is bounded for everyone's sake.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # per string
STOP_RULE = (f"must be a string or a list of at most {MAX_STOP_STRINGS} strings, each of 1 to {MAX_STOP_CHARS} "
             "characters")


@dataclass
class SamplingParams:
    """One request's decoding settings (OpenAI's names and meanings).

    max_tokens:  tokens to generate at most (the prompt's length plus this must fit the context).
    temperature: below 1e-5 (0 included) is greedy; otherwise logits are divided by it before sampling.
    top_p:       nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (the most
                 likely token is always kept).
    top_k:       keep the k most likely tokens (0: all).
    seed:        seeds this request's generator; the same seed gives the same tokens.
    stop:        up to 16 strings of up to 256 characters that end the generation; the text is cut before
                 the first one.
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
        need(isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= MAX_TEMPERATURE,
             f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {self.temperature!r}")
        need(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
             f"top_p must be in (0, 1], got {self.top_p!r}")
        need(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= -1,
             f"top_k must be a whole number >= 0 (0 or -1: off), got {self.top_k!r}")
        need(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
             f"seed must be a whole number, got {self.seed!r}")
        stop = stop_strings(self.stop)
        need(stop is not None, f"stop {STOP_RULE}")
        self.stop = stop

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def generator(self) -> Optional[torch.Generator]:
        """The request's own random generator (None for greedy decoding)."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        return torch.Generator().manual_seed(seed)


def stop_strings(stop) -> Optional[tuple[str, ...]]:
    """`stop` (None, a string or a list of strings) as a tuple of strings; None if it breaks STOP_RULE."""
    stops = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if isinstance(stops, (list, tuple)) and len(stops) <= MAX_STOP_STRINGS and all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        return tuple(stops)
    return None


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus; logits: (V,)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # the mass before a token already reaches top_p
        drop[0] = False  # a top_p that rounds to 0 in the logits' precision still keeps the most likely token
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def choose_next_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                       generators: Sequence[Optional[torch.Generator]]) -> list[int]:
    """The next token of every row; logits: (B, V) float, one SamplingParams and generator per row.

    A sampled row whose probabilities are not a distribution (the model produced NaN or infinite logits)
    keeps its argmax like a greedy row instead of failing the whole batch; valid SamplingParams over
    finite logits always give a distribution.
    """
    chosen = logits.argmax(-1).tolist()  # greedy rows, one vectorised op
    for row, (p, generator) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        row_logits = filter_top_k_top_p(logits[row].float() / p.temperature, p.top_k, p.top_p)
        probs = row_logits.softmax(-1).cpu()
        total = probs.sum()
        if torch.isfinite(total) and total > 0:  # NaN or inf anywhere makes the sum non-finite
            chosen[row] = int(torch.multinomial(probs, 1, generator=generator).item())
    return chosen
