"""The generation loop shared by every engine: left padding, sampling, stopping, timings.

`Decoding` runs one generation over any `Engine`: a batch of token-id prompts, left-padded,
is prefilled in one step, then one token per row is chosen per decode step (runtime/sampling.py)
until every row stops. Iterating a `Decoding` yields `(row, token)` as tokens are produced, so
callers can stream them and stop a row early (`stop(row)`, e.g. on a stop string); `Engine.generate`
is the plain ids-in, ids-out form.

A row stops on one of its end-of-sequence ids ("eos", the id is kept as its last token), when its
caller stops it ("stop"), or after `max_new_tokens` ("length"). A prompt whose `max_new_tokens`
would not fit the engine's context is refused before anything runs.

A generation can continue a cache (one row, no padding): the tokens already in the cache are
not run again. `Decoding.cache` after the loop holds the prompt and every produced token but the
last, which is how `runtime/session.py` keeps a chat's cache between turns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from dscompile.errors import EngineError
from dscompile.runtime.contract import KVCache, next_step_inputs, step_inputs
from dscompile.runtime.engine import Engine
from dscompile.runtime.sampling import SamplingParams, make_generator, next_tokens

@dataclass
class Timings:
    """Where a generation's time went: the prefill step, then the decode steps."""

    prefill_seconds: float = 0.0
    prefill_tokens: int = 0  # prompt tokens run (padding not counted; tokens already cached not run)
    decode_seconds: float = 0.0
    decode_steps: int = 0
    generated_tokens: int = 0  # over all rows
    rows: int = 1

    def to_dict(self) -> dict[str, float | int | None]:
        decoded = self.generated_tokens - min(self.generated_tokens, self.rows)
        return {
            "prefill_seconds": round(self.prefill_seconds, 6),
            "prefill_tokens": self.prefill_tokens,
            "prefill_tokens_per_second": _rate(self.prefill_tokens, self.prefill_seconds),
            "decode_seconds": round(self.decode_seconds, 6),
            "decode_steps": self.decode_steps,
            "generated_tokens": self.generated_tokens,
            # the first token of each row comes out of the prefill step
            "decode_tokens_per_second": _rate(decoded, self.decode_seconds),
        }


def _rate(n: int, seconds: float) -> float | None:
    return round(n / seconds, 3) if seconds > 0 and n > 0 else None


class Decoding:
    """One generation in progress over `engine`; iterate it for `(row, token)`.

    `eos_ids` end a row when produced. `seen` (per row) seeds the repetition penalty with tokens
    that came before the prompts (a chat's earlier turns); the prompts count too. `cache`
    continues a previous generation: one prompt, whose tokens follow the cache's.
    """

    def __init__(
        self,
        engine: Engine,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        params: SamplingParams = SamplingParams(),
        *,
        eos_ids: Sequence[int] = (),
        pad_token_id: int = 0,
        cache: KVCache | None = None,
        seen: Sequence[Sequence[int]] | None = None,
    ):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise EngineError("every prompt needs at least one token")
        if max_new_tokens < 0:
            raise EngineError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        params.check()
        past = cache.length if cache is not None else 0
        if cache is not None and len(prompts) != 1:
            raise EngineError(f"continuing a cache takes one prompt, got {len(prompts)}")
        self.engine, self.params = engine, params
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        batch, longest = len(prompts), max(len(p) for p in prompts)
        self._inputs = step_inputs(prompts, past, pad_token_id=pad_token_id)
        ids = self._inputs.input_ids
        if past + longest + max_new_tokens > engine.info.max_positions:
            raise EngineError(
                f"{'cache of ' + str(past) + ' + ' if past else ''}prompt of {longest} tokens + {max_new_tokens} "
                f"new tokens exceeds the engine's maximum of {engine.info.max_positions}"
            )
        engine.check_inputs(ids, past)  # ids in the vocabulary, positions within the engine's
        self._cache = cache
        self.max_new_tokens = max_new_tokens
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.finish_reasons: list[str | None] = [None] * batch
        self.seen = [list(seen[row]) if seen is not None else [] for row in range(batch)]
        for row, prompt in enumerate(prompts):
            self.seen[row].extend(int(t) for t in prompt)
        self.timings = Timings(prefill_tokens=sum(len(p) for p in prompts), rows=batch)
        self._started = False
        if self.max_new_tokens == 0:
            self.finish_reasons = ["length"] * batch

    @property
    def cache(self) -> KVCache | None:
        """The cache after the last step run: prompts and every produced token but each row's last."""
        return self._cache

    def stop(self, row: int, reason: str = "stop") -> None:
        """End `row` now (its tokens so far stay); the loop steps on while other rows run."""
        if self.finish_reasons[row] is None:
            self.finish_reasons[row] = reason

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self._started:
            raise EngineError("a Decoding runs once")
        self._started = True
        generator = make_generator(self.params)
        inputs, cache = self._inputs, self._cache
        batch = inputs.input_ids.shape[0]
        for step in range(self.max_new_tokens):
            if all(r is not None for r in self.finish_reasons):
                return
            start = time.perf_counter()
            logits, cache = self.engine.step(*inputs, cache, last_only=True)
            self._cache = cache
            chosen = next_tokens(logits[:, -1, :].float().cpu(), self.seen, self.params, generator)
            seconds = time.perf_counter() - start
            if step == 0:
                self.timings.prefill_seconds += seconds
            else:
                self.timings.decode_seconds += seconds
                self.timings.decode_steps += 1
            for row in range(batch):
                if self.finish_reasons[row] is not None:
                    continue
                token = int(chosen[row])
                self.tokens[row].append(token)
                self.seen[row].append(token)
                self.timings.generated_tokens += 1
                if token in self.eos_ids:
                    self.finish_reasons[row] = "eos"
                elif len(self.tokens[row]) == self.max_new_tokens:
                    self.finish_reasons[row] = "length"
                yield row, token
            if step + 1 == self.max_new_tokens or all(r is not None for r in self.finish_reasons):
                return
            inputs = next_step_inputs(chosen, inputs)
