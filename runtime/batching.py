"""Continuous batching over one engine: many requests, one engine thread, one ragged step at a time.

`Scheduler(engine)` serves token-id requests (`Request`) submitted from any thread. One engine
thread owns every cache: running sequences live in slot buffers (`SlotCache`, runtime/engine.py,
one [max_num_seqs, T, dim] buffer per cache tensor, T grown by CAPACITY_STEP to fit the longest
row); the decoding ones occupy the first B slots, so each iteration runs

1. admission: waiting requests (a FIFO bounded by `max_queue`) take a slot while fewer than
   `max_num_seqs` run; one at a time is prefilled;
2. one prefill chunk of at most `prefill_chunk` prompt tokens of that request (batch 1, the
   prefill graph with its own slot rows as past), so a long prompt does not stall the streams;
   when its last chunk has run, its first token is chosen and it joins the decoding rows;
3. one ragged decode step for every decoding row (`Engine.step_ragged`: each row at its own
   length; in place on ONNX Runtime's CPU provider, through the contract's decode graph with a
   mask that has holes elsewhere);
4. each row's next token, chosen from its own logits with its own SamplingParams and seeded
   generator, so what a request gets does not depend on what it runs beside (beyond float32
   batch-order noise); finished and cancelled rows leave at once (the last decoding row moves into
   the hole, so the decoding rows stay the first B slots).

Prefix cache (runtime/prefix_cache.py): a prompt is hashed in 16-token blocks, each block's key
chained from the previous one's; after a prompt is prefilled, the cache rows of its whole blocks
are kept in an LRU bounded in bytes. A new prompt starting with kept blocks copies their rows into
its slot and prefills the rest (at least its last token, whose logits give the first token).

Measured on the bench config (benchmarks/batching.py, 2 threads, context 128, on a machine shared
with other jobs, ratios from steps run in turn): a ragged step of 16 rows gives 3.3x the tokens/s
of batch-1 decode in float32 and 2.0x in int4; between two steps the scheduler spends under 1 ms
on 8 greedy rows, and a sampled row adds its own top-p sort over the vocabulary.

Events (`Token`, then `Finished` or `Failed`) go to the request's `on_event` callback, called on
the engine thread, and to its `Handle.events()`. An exception in the engine thread fails every
request in flight, sets `failure` and stops the thread; a request's own bad input is refused at
`submit`, never in the thread.
"""

from __future__ import annotations

import collections
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Union

import torch

from dscompile.errors import EngineError, OptionError, first_line
from dscompile.runtime.engine import Engine, SlotCache
from dscompile.runtime.prefix_cache import PrefixCache
from dscompile.runtime.sampling import (SamplingParams, filter_scores, make_generator, penalize_counts,
                                        penalize_seen)

CAPACITY_STEP = 128  # tokens: slot buffers grow (and shrink when idle) by this much
MAX_LOGPROBS = 20  # top logprobs a request may ask for (OpenAI's limit)
SHUTDOWN = "server shutting down"


@dataclass(frozen=True)
class Request:
    """One generation: a prompt of token ids continued by up to `max_tokens` tokens."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = SamplingParams()
    eos_ids: frozenset[int] = frozenset()  # empty: run to max_tokens
    logprobs: int | None = None  # None: none; 0: the chosen token's; k > 0: also the k best
    presence_penalty: float = 0.0  # OpenAI's, over generated tokens
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class Token:
    """One generated token; logprobs from the distribution it was drawn from (after penalties and
    temperature, top-k/top-p applied), when the request asked for them."""

    id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()  # best first


@dataclass(frozen=True)
class Finished:
    reason: str  # "eos" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens taken from the prefix cache
    queue_seconds: float  # submit -> first scheduled
    ttft_seconds: float  # submit -> first token
    e2e_seconds: float  # submit -> finished


@dataclass(frozen=True)
class Failed:
    message: str  # one line


Event = Union[Token, Finished, Failed]


class QueueFull(EngineError):
    """`submit` while `max_queue` requests are already waiting."""


class Handle:
    """A submitted request: its events, and a way to cancel it."""

    def __init__(self, id: int, scheduler: "Scheduler"):
        self.id = id
        self._scheduler = scheduler
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False

    def cancel(self) -> None:
        """End the request (thread-safe): Finished("cancelled") follows and its slot is freed at
        the next step boundary."""
        self.cancelled = True
        self._scheduler._wake()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The request's events as they come (blocking), ending after Finished or Failed. Waiting
        more than `timeout` seconds for one raises TimeoutError."""
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.id}: no event within {timeout} s") from None
            yield event
            if isinstance(event, (Finished, Failed)):
                return


@dataclass
class _Sequence:
    """A request in the engine thread: where it is, what it has produced."""

    request: Request
    handle: Handle
    on_event: Callable[[Event], None] | None
    submitted: float
    scheduled: float = 0.0
    first_token: float = 0.0
    slot: int = -1
    length: int = 0  # tokens in its slot's cache
    cached: int = 0  # of them, from the prefix cache
    next_token: int = -1  # chosen, not yet run
    generated: int = 0
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # [V] bool: prompt + generated ids (repetition penalty)
    counts: torch.Tensor | None = None  # [V] float32: generated ids (presence/frequency penalties)

    @property
    def prefilled(self) -> bool:
        return self.length >= len(self.request.prompt)


class Scheduler:
    """Continuous batching of token-id requests over `engine` (see the module docstring)."""

    def __init__(self, engine: Engine, *, max_num_seqs: int = 8, max_queue: int = 64, prefill_chunk: int = 128,
                 max_model_len: int | None = None, prefix_cache_bytes: int = 256 << 20):
        for name, value, low in (("max_num_seqs", max_num_seqs, 1), ("max_queue", max_queue, 1),
                                 ("prefill_chunk", prefill_chunk, 1), ("prefix_cache_bytes", prefix_cache_bytes, 0)):
            if not isinstance(value, int) or value < low:
                raise OptionError(f"{name} must be an integer >= {low}, got {value}")
        limit = engine.info.max_positions
        if max_model_len is not None and not (isinstance(max_model_len, int) and 2 <= max_model_len <= limit):
            raise OptionError(f"max_model_len must be an integer in [2, {limit}] (the engine's maximum), "
                              f"got {max_model_len}")
        if engine.max_batch is not None and max_num_seqs > engine.max_batch:
            raise OptionError(f"max_num_seqs {max_num_seqs} exceeds the {engine.max_batch} rows a step of this engine "
                              f"takes (its export's --max-batch)")
        self.engine = engine
        self.max_num_seqs, self.max_queue = max_num_seqs, max_queue
        self.prefill_chunk = min(prefill_chunk, engine.max_step_tokens or prefill_chunk)  # a chunk is one step
        self.max_model_len = max_model_len if max_model_len is not None else limit
        self.ready = False
        self.failure: str | None = None
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running = 0  # decoding + prefilling, as the engine thread last left them (stats)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._next_id = 0
        self._prefix = PrefixCache(prefix_cache_bytes)
        self._slots: SlotCache | None = None
        self._decoding: list[_Sequence] = []
        self._prefilling: _Sequence | None = None
        self._totals = dict(prompt_tokens_total=0, generation_tokens_total=0, prefix_cache_queries_total=0,
                            prefix_cache_hits_total=0, aborted_total=0, steps_total=0)
        self._bytes_in_use = 0

    # -- the caller's side (any thread) --------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; it runs a warm-up step, then sets `ready` and takes requests."""
        with self._lock:
            if self._thread is not None:
                raise EngineError("the scheduler is already started")
            self._thread = threading.Thread(target=self._main, name="dscompile-engine", daemon=True)
            self._thread.start()

    def submit(self, request: Request, on_event: Callable[[Event], None] | None = None) -> Handle:
        """Queue a request (checked now: OptionError/EngineError with a one-line reason; QueueFull
        when `max_queue` requests wait). Events go to `on_event` (on the engine thread) and to the
        returned handle's `events()`."""
        self._check(request)
        with self._lock:
            if self.failure is not None:
                raise EngineError(self.failure)
            if self._stopping:
                raise EngineError(SHUTDOWN)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting, the queue's maximum (max_queue "
                                f"{self.max_queue})")
            handle = Handle(self._next_id, self)
            self._next_id += 1
            self._waiting.append(_Sequence(request, handle, on_event, time.perf_counter()))
            self._work.notify()
        return handle

    def close(self) -> None:
        """Stop the engine thread; requests in flight end with Failed("server shutting down")."""
        with self._lock:
            self._stopping = True
            self._work.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if thread is None:  # never started: fail what waits here
            self._fail_all(SHUTDOWN)

    def stats(self) -> dict:
        """A snapshot of the counters (thread-safe)."""
        with self._lock:
            return dict(running=self._running, waiting=len(self._waiting), **self._totals,
                        cache_bytes_in_use=self._bytes_in_use + self._prefix.nbytes,
                        prefix_cache_bytes=self._prefix.nbytes)

    def _wake(self) -> None:
        with self._lock:
            self._work.notify()

    def _check(self, r: Request) -> None:
        """Refuse a request the engine thread could not run, in one line naming the numbers."""
        if not isinstance(r, Request):
            raise OptionError(f"submit takes a Request, got {type(r).__name__}")
        if len(r.prompt) < 1:
            raise OptionError("the prompt needs at least one token")
        if not (isinstance(r.max_tokens, int) and r.max_tokens >= 1):
            raise OptionError(f"max_tokens must be an integer >= 1, got {r.max_tokens}")
        if len(r.prompt) + r.max_tokens > self.max_model_len:
            raise OptionError(f"prompt of {len(r.prompt)} tokens + max_tokens {r.max_tokens} = "
                              f"{len(r.prompt) + r.max_tokens} exceeds the maximum context of {self.max_model_len}")
        vocab = self.engine.info.vocab_size
        bad = [t for t in r.prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise OptionError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if not isinstance(r.params, SamplingParams):
            raise OptionError(f"params must be a SamplingParams, got {type(r.params).__name__}")
        r.params.check()
        if r.logprobs is not None and not (isinstance(r.logprobs, int) and 0 <= r.logprobs <= MAX_LOGPROBS):
            raise OptionError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {r.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(r, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and -2 <= value <= 2):
                raise OptionError(f"{name} must be a number in [-2, 2], got {value}")

    # -- the engine thread ---------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._slots = self.engine.new_slots(self.max_num_seqs, CAPACITY_STEP)
            self._warm_up()
            self.ready = True
            while self._iteration():
                pass
            self._fail_all(SHUTDOWN)
        except Exception as err:  # noqa: BLE001 - any engine fault ends every request, in one line
            message = f"engine failed: {first_line(err)}"
            with self._lock:
                self.failure = message
            self._fail_all(message)

    def _warm_up(self) -> None:
        """A prefill and a decode step of a dummy prompt in slot 0, through the serving paths."""
        prompt = [0] * min(4, self.max_model_len - 1)
        self.engine.prefill_slot(prompt, self._slots, 0, 0)
        self.engine.step_ragged(torch.tensor([0]), torch.tensor([len(prompt)]), self._slots)

    def _iteration(self) -> bool:
        """One step boundary and the steps after it; False when the thread should stop."""
        with self._lock:
            while not self._stopping and not self._waiting and not self._decoding and self._prefilling is None:
                self._work.wait()
            if self._stopping:
                return False
            cancelled = [s for s in self._waiting if s.handle.cancelled]
            for s in cancelled:
                self._waiting.remove(s)
            admitted = None
            if self._prefilling is None and self._waiting and len(self._decoding) < self.max_num_seqs:
                admitted = self._waiting.popleft()
        for s in cancelled:
            self._finish(s, "cancelled")
        for s in [s for s in self._decoding if s.handle.cancelled]:
            self._finish(s, "cancelled")
        if self._prefilling is not None and self._prefilling.handle.cancelled:
            self._finish(self._prefilling, "cancelled")
        if admitted is not None:
            self._admit(admitted)
        if self._prefilling is not None:
            self._prefill_chunk(self._prefilling)
        if self._decoding:
            self._decode()
        with self._lock:
            self._totals["steps_total"] += 1
        self._count()
        if not self._running and self._slots.capacity > CAPACITY_STEP:
            self._slots.resize(CAPACITY_STEP)  # idle: give the memory back
        return True

    def _count(self) -> None:
        """Publish the running rows and the cache bytes they hold (stats)."""
        rows = self._decoding + ([self._prefilling] if self._prefilling is not None else [])
        with self._lock:
            self._running = len(rows)
            self._bytes_in_use = sum(s.length for s in rows) * (self._slots.bytes_per_token if self._slots else 0)

    def _admit(self, s: _Sequence) -> None:
        """Give `s` the slot after the decoding rows, copy its cached prefix there, set up sampling."""
        vocab = self.engine.info.vocab_size
        s.scheduled = time.perf_counter()
        s.slot = len(self._decoding)
        prompt = s.request.prompt
        blocks = self._prefix.lookup(prompt)
        s.cached = min(len(blocks) * self._prefix.block, len(prompt) - 1)
        self._ensure_capacity(max(s.cached, 1))
        for i, block in enumerate(blocks):
            start = i * self._prefix.block
            n = min(self._prefix.block, s.cached - start)
            if n > 0:
                self._slots.write(s.slot, start, [t[:n] for t in block.rows])
        s.length = s.cached
        s.generator = make_generator(s.request.params)
        if s.request.params.repetition_penalty != 1.0:
            s.seen = torch.zeros(vocab, dtype=torch.bool)
            s.seen[torch.tensor(prompt)] = True
        if s.request.presence_penalty or s.request.frequency_penalty:
            s.counts = torch.zeros(vocab, dtype=torch.float32)
        with self._lock:
            self._totals["prefix_cache_queries_total"] += len(prompt)
            self._totals["prefix_cache_hits_total"] += s.cached
        self._prefilling = s
        self._count()

    def _prefill_chunk(self, s: _Sequence) -> None:
        prompt = s.request.prompt
        chunk = prompt[s.length: s.length + self.prefill_chunk]
        self._ensure_capacity(s.length + len(chunk))
        logits = self.engine.prefill_slot(chunk, self._slots, s.slot, s.length).cpu()  # sampling runs on CPU
        s.length += len(chunk)
        if not s.prefilled:
            return
        self._prefilling = None
        self._prefix.insert(prompt, self._slots, s.slot)
        with self._lock:
            self._totals["prompt_tokens_total"] += len(prompt)
        self._decoding.append(s)  # its slot is len(decoding) already: the decoding rows stay the first B
        self._choose(s, logits)

    def _decode(self) -> None:
        rows = list(self._decoding)
        lengths = torch.tensor([s.length for s in rows], dtype=torch.int64)
        self._ensure_capacity(int(lengths.max()) + 1)
        tokens = torch.tensor([s.next_token for s in rows], dtype=torch.int64)
        logits = self.engine.step_ragged(tokens, lengths, self._slots).cpu()
        for s in rows:  # every row's new cache row counts before any row leaves (and moves the others)
            s.length += 1
        # plain greedy rows (most of a server's) take one argmax over the batch; the others their own path
        plain = [i for i, s in enumerate(rows) if s.seen is None and s.counts is None and s.request.logprobs is None
                 and s.request.params.temperature == 0]
        chosen = dict(zip(plain, logits[plain].argmax(dim=-1).tolist())) if plain else {}
        for i, s in enumerate(rows):
            if i in chosen:
                self._accept(s, chosen[i], Token(chosen[i]))
            else:
                self._choose(s, logits[i])

    def _choose(self, s: _Sequence, logits: torch.Tensor) -> None:
        """Pick `s`'s next token from its logits [V] (its penalties, temperature, filters and
        generator) and accept it."""
        r, params = s.request, s.request.params
        scores = logits.float().unsqueeze(0)
        if s.seen is not None:
            scores = penalize_seen(scores, s.seen.unsqueeze(0), params.repetition_penalty)
        if s.counts is not None:
            scores = penalize_counts(scores, s.counts.unsqueeze(0), r.presence_penalty, r.frequency_penalty)
        if params.temperature == 0:
            token = int(scores.argmax(dim=-1))
            dist = scores
        else:
            dist = filter_scores(scores, params)
            token = int(torch.multinomial(torch.softmax(dist, dim=-1), 1, generator=s.generator))
        event = Token(token)
        if r.logprobs is not None:
            logp = torch.log_softmax(dist[0], dim=-1)
            top = ()
            if r.logprobs > 0:
                values, ids = torch.topk(logp, min(r.logprobs, int(logp.shape[0])))
                top = tuple((int(i), float(v)) for i, v in zip(ids, values))
            event = Token(token, float(logp[token]), top)
        self._accept(s, token, event)

    def _accept(self, s: _Sequence, token: int, event: Token) -> None:
        """`token` is `s`'s next: count it, emit it, end `s` on eos or max_tokens."""
        r = s.request
        if s.generated == 0:
            s.first_token = time.perf_counter()
        s.generated += 1
        s.next_token = token
        if s.seen is not None:
            s.seen[token] = True
        if s.counts is not None:
            s.counts[token] += 1
        with self._lock:
            self._totals["generation_tokens_total"] += 1
        self._emit(s, event)
        if token in r.eos_ids:
            self._finish(s, "eos")
        elif s.generated >= r.max_tokens:
            self._finish(s, "length")

    def _finish(self, s: _Sequence, reason: str) -> None:
        """End `s` with Finished(reason) and free its slot."""
        self._release(s)
        now = time.perf_counter()
        if reason == "cancelled":
            with self._lock:
                self._totals["aborted_total"] += 1
        scheduled = s.scheduled or now
        self._emit(s, Finished(reason, len(s.request.prompt), s.generated, s.cached, scheduled - s.submitted,
                               (s.first_token or now) - s.submitted, now - s.submitted))

    def _release(self, s: _Sequence) -> None:
        """Take `s` out of the running rows; the last decoding row moves into its slot (and the
        prefilling row into the slot after the decoding ones)."""
        if s is self._prefilling:
            self._prefilling = None
        elif s in self._decoding:
            k = self._decoding.index(s)
            last = self._decoding[-1]
            if last is not s:
                self._slots.move(last.slot, k, last.length)
                last.slot = k
                self._decoding[k] = last
            self._decoding.pop()
            p = self._prefilling
            if p is not None and p.slot != len(self._decoding):
                self._slots.move(p.slot, len(self._decoding), p.length)
                p.slot = len(self._decoding)
        s.slot = -1
        self._count()

    def _ensure_capacity(self, tokens: int) -> None:
        """Slot buffers of at least `tokens` rows (grown by CAPACITY_STEP)."""
        if tokens > self._slots.capacity:
            self._slots.resize(-(-tokens // CAPACITY_STEP) * CAPACITY_STEP)

    def _emit(self, s: _Sequence, event: Event) -> None:
        s.handle._events.put(event)
        if s.on_event is not None:
            try:
                s.on_event(event)
            except Exception:  # noqa: BLE001 - a caller's callback must not stop the engine: end its request
                s.handle.cancelled = True

    def _fail_all(self, message: str) -> None:
        """End every request in flight (running or waiting) with Failed(message)."""
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        running = list(self._decoding) + ([self._prefilling] if self._prefilling is not None else [])
        self._decoding, self._prefilling = [], None
        with self._lock:
            self._totals["aborted_total"] += len(waiting) + len(running)
            self._running = 0
            self._bytes_in_use = 0
        for s in running + waiting:
            self._emit(s, Failed(message))
