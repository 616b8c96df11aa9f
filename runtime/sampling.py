"""Token selection for the generation loop: greedy decoding or seeded sampling from filtered logits.

Each step turns the last position's logits [B, V] into one token id per row, as Hugging Face
`generate` does with the same settings:

    repetition penalty -> temperature -> top-k -> top-p -> softmax -> multinomial draw

The repetition penalty (CTRL rule) divides the positive logits of ids a row has already seen
(prompt and generated tokens) by the penalty and multiplies the negative ones, once per distinct
id. Greedy decoding (`temperature == 0`) takes the argmax of the penalized logits; top-k and
top-p cannot change the argmax, so they are skipped there. Removed entries are -inf.
Sampling draws with a CPU `torch.Generator` seeded from `SamplingParams.seed` (0 when unset),
so runs are reproducible by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from dscompile.errors import OptionError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from the logits."""

    temperature: float = 0.0  # 0 -> greedy (argmax after the repetition penalty)
    top_p: float = 1.0  # nucleus mass, (0, 1]; 1 -> off
    top_k: int = 0  # 0 -> off; else keep the k largest logits (and any tied with the k-th)
    repetition_penalty: float = 1.0  # > 0; 1 -> off; > 1 discourages seen ids, < 1 favours them
    seed: int | None = None  # None -> 0

    def check(self) -> None:
        """Raise OptionError naming the first field outside its allowed range."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise OptionError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise OptionError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise OptionError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise OptionError(
                f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}"
            )
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**64):
            raise OptionError(f"seed must be an integer in [0, 2**64), got {self.seed}")


def make_generator(params: SamplingParams) -> torch.Generator:
    """A CPU generator seeded with `params.seed`, or 0 when it is unset."""
    return torch.Generator().manual_seed(params.seed if params.seed is not None else 0)


def process_logits(
    logits: torch.Tensor, seen: Sequence[Sequence[int]] | None, params: SamplingParams
) -> torch.Tensor:
    """Logits [B, V] -> the float32 logits sampling draws from; the input is never written to.

    `seen[row]` lists the ids row `row` has seen so far (prompt + generated; repeats allowed);
    None means no history. Applies the repetition penalty, the temperature (when > 0), top-k and
    top-p; removed entries are -inf.
    """
    return filter_scores(_penalize(logits.float(), seen, params.repetition_penalty), params)


def filter_scores(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Penalized scores [B, V] -> what sampling draws from: divided by the temperature (when > 0),
    then top-k and top-p applied; removed entries are -inf. `scores` is not written to."""
    if params.temperature > 0:
        scores = scores / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)  # ties with the k-th largest stay
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - params.top_p)  # the low tail holding at most 1 - top_p of the mass
        drop[..., -1:] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return scores


def next_tokens(
    logits: torch.Tensor,
    seen: Sequence[Sequence[int]] | None,
    params: SamplingParams,
    generator: torch.Generator,
) -> torch.Tensor:
    """Logits [B, V] -> the next token id per row [B] (int64).

    Greedy (`temperature == 0`): argmax of the penalized logits (first index on ties); the
    generator is not used. Otherwise one multinomial draw per row from softmax(process_logits).
    """
    if params.temperature == 0:
        return _penalize(logits.float(), seen, params.repetition_penalty).argmax(dim=-1)
    probs = torch.softmax(process_logits(logits, seen, params), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _penalize(scores: torch.Tensor, seen: Sequence[Sequence[int]] | None, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty on each row's seen ids: negative logits * penalty, others / penalty.
    Ids outside [0, V) are ignored (the model cannot produce them)."""
    if seen is None or penalty == 1.0:
        return scores
    batch, vocab = scores.shape
    if len(seen) != batch:
        raise ValueError(f"seen has {len(seen)} rows, logits have {batch}")
    ids = [torch.as_tensor(row, dtype=torch.int64).reshape(-1) for row in seen]
    rows = torch.repeat_interleave(torch.arange(batch), torch.tensor([len(row) for row in ids]))
    cols = torch.cat(ids)
    inside = (cols >= 0) & (cols < vocab)
    mask = torch.zeros(batch, vocab, dtype=torch.bool)
    mask[rows[inside], cols[inside]] = True
    return penalize_seen(scores, mask, penalty)


def penalize_seen(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty where the bool mask `seen` (shaped like `scores`) is set: negative
    logits * penalty, others / penalty (a caller that keeps a row's seen ids as a mask)."""
    if penalty == 1.0:
        return scores
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen.to(scores.device), penalized, scores)


def penalize_counts(scores: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: each id's score minus `presence` if it was
    generated at all and `frequency` times the number of times it was (`counts`, shaped like
    `scores`); the prompt does not count."""
    if presence == 0 and frequency == 0:
        return scores
    return scores - (counts > 0).to(scores.dtype) * presence - counts.to(scores.dtype) * frequency
