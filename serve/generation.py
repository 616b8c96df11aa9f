"""One request's generation as the HTTP layer sees it: token ids from the scheduler, text out.

The scheduler (runtime/batching.py) runs every request on one engine thread and deals in token
ids. This module is the bridge: it turns a checked request (serve/protocol.py) into the
scheduler's `Request` (sampling defaults from generation_config.json through
`TextEngine.sampling`, the prompt and max_tokens checked against the served length), forwards the
engine thread's events into the request's asyncio queue, and turns token ids into text
incrementally (`DetokenizeStream`: streamed pieces concatenate to the final text). A stop string
(`StopStrings`) ends the text and cancels the request in the scheduler, so its slot frees at once.

`Generation` is an async iterator of `Delta`s (text and the token it came from, when logprobs were
asked) ending with the request's `Outcome`; a caller that stops iterating early (a client gone)
calls `cancel()`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from dscompile.errors import DscompileError, first_line
from dscompile.runtime.batching import Failed, Finished, QueueFull, Request, Scheduler, Token
from dscompile.runtime.session import TextEngine
from dscompile.runtime.text import StopStrings

from dscompile.serve.protocol import DEFAULT_MAX_TOKENS, APIError, Sampling, bad

FINISH_REASONS = {"eos": "stop", "length": "length", "stop": "stop", "cancelled": "abort"}
PING_SECONDS = 2.0


@dataclass
class Delta:
    """New text, and the token it ends with (None for the held-back tail flushed at the end)."""

    text: str
    token: Token | None = None


@dataclass
class Outcome:
    """How a generation ended, for the last chunk and the usage."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Ping:
    """Nothing to send yet (the request waits or prefills): a keep-alive for a stream."""


@dataclass
class Timing:
    """Arrival times of a request's tokens, taken on the engine thread (inter-token latency)."""

    last: float | None = None
    gaps: list[float] = field(default_factory=list)


class Served:
    """The model behind the server: the scheduler over the engine and the text around it."""

    def __init__(self, text: TextEngine, scheduler: Scheduler, name: str, metrics=None):
        self.text, self.scheduler, self.name, self.metrics = text, scheduler, name, metrics

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len

    def tokenizer(self, what: str):
        try:
            return self.text._need_tokenizer(what)
        except DscompileError as err:
            raise bad(None, first_line(err)) from None

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.tokenizer("apply a chat template")
        try:
            return tok.encode(tok.render_chat(messages, add_generation_prompt=True), add_special_tokens=False)
        except DscompileError as err:
            raise bad("messages", first_line(err)) from None

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            vocab = self.text.engine.info.vocab_size
            outside = [t for t in prompt if not 0 <= t < vocab]
            if outside:
                raise bad("prompt", f"prompt: token id {outside[0]} is outside the vocabulary [0, {vocab})")
            return prompt
        try:
            ids = self.tokenizer("encode a text prompt").encode(prompt)
        except DscompileError as err:
            raise bad("prompt", first_line(err)) from None
        if not ids:
            raise bad("prompt", "prompt encodes to no tokens")
        return ids

    def request(self, ids: list[int], s: Sampling, prompt_field: str = "prompt") -> Request:
        """The scheduler's request for prompt `ids`: limits checked, sampling defaults applied."""
        limit, max_field = self.max_model_len, s.max_field
        if len(ids) >= limit:
            raise bad(prompt_field,
                      f"the prompt has {len(ids)} tokens; this model's maximum context length is {limit} "
                      f"tokens, and at least one must be left for the completion", code="context_length_exceeded")
        room = limit - len(ids)
        if s.max_tokens is not None and s.max_tokens > room:
            raise bad(max_field, f"the prompt has {len(ids)} tokens and {max_field} is {s.max_tokens}: "
                      f"{len(ids) + s.max_tokens} tokens, more than this model's maximum context length of {limit}",
                      code="context_length_exceeded")
        max_tokens = s.max_tokens if s.max_tokens is not None else min(DEFAULT_MAX_TOKENS, room)
        options = dict(max_new_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                       repetition_penalty=s.repetition_penalty, seed=s.seed)
        try:
            params, max_tokens = self.text.sampling(options)
        except DscompileError as err:
            raise bad(None, first_line(err)) from None
        if s.stop:
            self.tokenizer("match stop strings")
        eos = frozenset() if s.ignore_eos else frozenset(self.text.eos_ids)
        return Request(prompt=list(ids), max_tokens=max_tokens, params=params, eos_ids=eos, logprobs=s.logprobs,
                       presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty)

    def start(self, request: Request, stop: list[str]) -> "Generation":
        """Submit `request`; APIError 503 when the queue is full or the engine failed, 400 when refused."""
        if self.scheduler.failure is not None:
            raise APIError(503, self.scheduler.failure, type="server_error",
                           code="engine_failed")
        generation = Generation(self, request, stop)
        try:
            generation.handle = self.scheduler.submit(request, on_event=generation._on_event)
        except QueueFull as err:
            raise APIError(503, f"the server is busy ({first_line(err)}); retry later", type="server_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except DscompileError as err:
            if self.scheduler.failure is not None:
                raise APIError(503, self.scheduler.failure, type="server_error",
                               code="engine_failed") from None
            raise bad(None, first_line(err)) from None
        return generation


class Generation:
    """A submitted request: iterate for `Delta`s, `Ping`s (stream keep-alives), then one `Outcome`."""

    def __init__(self, served: Served, request: Request, stop: list[str]):
        self.served, self.request = served, request
        self.handle = None
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        tokenizer = served.text.tokenizer
        self._detok = tokenizer.stream() if tokenizer is not None else None
        self._stops = StopStrings(stop) if stop else None
        self._timing = Timing()
        self.finished = False
        self.tokens: list[int] = []

    def _on_event(self, event) -> None:
        """Called on the engine thread: stamp token arrivals, hand the event to the request's loop."""
        if isinstance(event, Token):
            now = time.perf_counter()
            if self._timing.last is not None:
                self._timing.gaps.append(now - self._timing.last)
            self._timing.last = now
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is stopping
            pass

    def cancel(self) -> None:
        if not self.finished and self.handle is not None:
            self.handle.cancel()
            self.finished = True

    async def events(self, pings: bool = False) -> AsyncIterator[Delta | Ping | Outcome]:
        stopped = False
        while True:
            if pings:
                try:
                    event = await asyncio.wait_for(self._queue.get(), PING_SECONDS)
                except asyncio.TimeoutError:
                    yield Ping()
                    continue
            else:
                event = await self._queue.get()
            if isinstance(event, Token):
                if stopped:
                    continue  # produced after a stop string, before the cancel took effect
                self.tokens.append(event.id)
                text = self._detok.push(event.id) if self._detok is not None else ""
                if self._stops is not None:
                    text, stopped = self._stops.feed(text)
                    if stopped:
                        self.handle.cancel()
                yield Delta(text, event)
            elif isinstance(event, Finished):
                self.finished = True
                reason = "stop" if stopped else event.reason
                tail = "" if stopped else self._tail()
                if not stopped and self._stops is not None:  # the held-back start of a stop string, if any
                    tail, hit = self._stops.feed(tail)
                    reason = "stop" if hit else reason
                    tail += "" if hit else self._stops.flush()
                if tail:
                    yield Delta(tail)
                outcome = Outcome(FINISH_REASONS.get(reason, reason), event.prompt_tokens, len(self.tokens),
                                  event.cached_tokens)
                if self.served.metrics is not None:
                    self.served.metrics.finished(event, self._timing.gaps, outcome.finish_reason)
                yield outcome
                return
            elif isinstance(event, Failed):
                self.finished = True
                if self.served.metrics is not None:
                    self.served.metrics.failed()
                raise APIError(500, f"generation failed: {event.message}", type="server_error", code="engine_error")

    def _tail(self) -> str:
        return self._detok.flush() if self._detok is not None else ""
