"""Continuous batching (runtime/batching.py): a request's tokens do not depend on what runs beside it,
the ragged step matches single-row steps, the prefix cache, cancel, and the failure paths."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dscompile.errors import EngineError, OptionError
from dscompile.runtime.batching import Failed, Finished, QueueFull, Request, Scheduler, Token
from dscompile.runtime.contract import next_step_inputs, step_inputs
from dscompile.runtime.engine import Engine
from dscompile.runtime.sampling import SamplingParams
from dscompile.tolerance import TOLERANCE, bound

TIMEOUT = 60  # seconds to wait for one event: a stuck engine thread fails the test instead of hanging it


@pytest.fixture(scope="module")
def engine(exported):
    from dscompile.runtime.session import open_engine

    return open_engine(exported("v3"), threads=1)


@pytest.fixture(scope="module")
def torch_engine(exported):
    from dscompile.runtime.session import open_engine

    return open_engine(exported("v3"), backend="torch", threads=1)


@pytest.fixture(scope="module")
def int4_engine(tmp_path_factory, one_layer_ckpt):
    """The smallest checkpoint exported int4 (one session on the contract's decode graph)."""
    import dscompile
    from dscompile.runtime.session import open_engine

    out = tmp_path_factory.mktemp("int4") / "out"
    dscompile.export(one_layer_ckpt, out, weights="int4", block_size=16, max_batch=4, max_prompt_tokens=64,
                     max_context=128)
    return open_engine(out, threads=1)


def prompts_of(engine, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, engine.info.vocab_size, (n,), generator=gen).tolist() for n in lengths]


def collect(handle) -> tuple[list[int], Finished | Failed]:
    events = list(handle.events(timeout=TIMEOUT))
    assert all(isinstance(e, Token) for e in events[:-1])
    return [e.id for e in events[:-1]], events[-1]


@pytest.fixture
def scheduler_of():
    made = []

    def make(engine, **kw) -> Scheduler:
        s = Scheduler(engine, **kw)
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize("which", ["engine", "int4_engine", "torch_engine"])
def test_ragged_step_matches_single_rows(which, request):
    """Rows at different lengths in one step give each row's logits of its own single-row step, in the
    engine's own form (ONNX Runtime in place, float32 and int4; the int4 engine also prefills its slots
    in place) and the base's generic form through `step` (a mask that has holes, through the engines'
    in-place graphs; the torch programs)."""
    engine = request.getfixturevalue(which)
    lengths = [5, 17, 40, 3]
    prompts = prompts_of(engine, lengths)
    new = torch.tensor([7, 1, 30, 12])
    expected = []
    for prompt, token in zip(prompts, new):
        inputs = step_inputs([prompt])
        _, cache = engine.step(*inputs, None)
        logits, _ = engine.step(*next_step_inputs(token.view(1), inputs), cache)
        expected.append(logits[0, -1])
    expected = torch.stack(expected)
    for form in (type(engine).step_ragged, Engine.step_ragged):
        slots = engine.new_slots(6, 64)
        for i, prompt in enumerate(prompts):
            engine.prefill_slot(prompt, slots, i + 1, 0)
        got = form(engine, new, torch.tensor(lengths), slots, first=1)
        err = (got - expected).abs()
        limit = bound(torch.float32, float(expected.abs().max()), TOLERANCE)
        assert float(err.max()) <= limit, f"{form.__qualname__}: max {err.max():.3g} mean {err.mean():.3g} > {limit:.3g}"
        # each row's new cache row went to its own slot, at its own length
        for i, n in enumerate(lengths):
            assert float(slots.tensors[0][i + 1, n].abs().sum()) > 0
            assert float(slots.tensors[0][i + 1, n + 1:].abs().sum()) == 0


def test_concurrent_requests_get_solo_tokens(engine, scheduler_of):
    """16 requests of different prompt lengths and max_tokens, arriving over time, batched 4 at a
    time with chunked prefill: each gets exactly the tokens and finish reason of its solo run."""
    lengths = [1, 3, 9, 17, 24, 33, 40, 48, 2, 15, 16, 31, 60, 5, 11, 20]
    max_tokens = [4, 9, 1, 12, 6, 3, 10, 7, 8, 5, 11, 2, 6, 12, 4, 9]
    prompts = prompts_of(engine, lengths, seed=1)
    solo = [engine.generate([p], n)[0] for p, n in zip(prompts, max_tokens)]
    # a few requests stop at an eos id: their solo run's third token
    eos = [frozenset([s[2]]) if i % 5 == 0 and len(s) > 3 else frozenset() for i, s in enumerate(solo)]
    expected = [s[: s.index(next(iter(e))) + 1] if e else s for s, e in zip(solo, eos)]
    scheduler = scheduler_of(engine, max_num_seqs=4, prefill_chunk=16, prefix_cache_bytes=0)
    handles = [None] * len(prompts)

    def arrive():
        for i, (p, n) in enumerate(zip(prompts, max_tokens)):
            handles[i] = scheduler.submit(Request(p, n, SamplingParams(), eos_ids=eos[i]))
            time.sleep(0.002 * (i % 4))

    thread = threading.Thread(target=arrive)
    thread.start()
    thread.join()
    for i, handle in enumerate(handles):
        tokens, end = collect(handle)
        assert tokens == expected[i], f"request {i} (prompt {lengths[i]}, max_tokens {max_tokens[i]})"
        assert isinstance(end, Finished) and end.reason == ("eos" if eos[i] else "length")
        assert (end.prompt_tokens, end.completion_tokens) == (lengths[i], len(expected[i]))
        assert 0 <= end.queue_seconds <= end.ttft_seconds <= end.e2e_seconds
    stats = scheduler.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["prompt_tokens_total"] == sum(lengths)
    assert stats["generation_tokens_total"] == sum(len(e) for e in expected)


def test_torch_backend_batches_too(torch_engine, scheduler_of):
    """The generic path (torch programs): batched greedy tokens are the solo ones; the programs' batch
    bound limits max_num_seqs."""
    prompts = prompts_of(torch_engine, [5, 17, 3], seed=8)
    solo = [torch_engine.generate([p], 5)[0] for p in prompts]
    scheduler = scheduler_of(torch_engine, max_num_seqs=2, prefill_chunk=8)
    handles = [scheduler.submit(Request(p, 5, SamplingParams())) for p in prompts]
    assert [collect(h)[0] for h in handles] == solo
    with pytest.raises(OptionError, match="max_num_seqs 9 exceeds the 8 rows a step of this engine takes"):
        Scheduler(torch_engine, max_num_seqs=9)


def test_seeded_sampling_does_not_depend_on_batching(engine, scheduler_of):
    """Sampled requests (each its own seed, temperature, top-p/top-k, repetition penalty) batched with
    others draw the tokens of their solo run."""
    settings = [SamplingParams(temperature=0.9, top_p=0.9, seed=3),
                SamplingParams(temperature=1.3, top_k=20, seed=11, repetition_penalty=1.2),
                SamplingParams(temperature=0.7, seed=None),
                SamplingParams()]
    prompts = prompts_of(engine, [6, 21, 13, 35], seed=2)
    solo = [engine.generate([p], 10, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                            repetition_penalty=s.repetition_penalty, seed=s.seed)[0] for p, s in zip(prompts, settings)]
    scheduler = scheduler_of(engine, max_num_seqs=4, prefill_chunk=8)
    handles = [scheduler.submit(Request(p, 10, s)) for p, s in zip(prompts, settings)]
    assert [collect(h)[0] for h in handles] == solo


def test_prefix_cache_reuses_whole_blocks(engine, scheduler_of):
    """A prompt sharing two 16-token blocks with an earlier one copies their cache rows and gets the
    tokens it gets without the cache."""
    first, second = prompts_of(engine, [40, 45], seed=3)
    second = first[:32] + second[32:]
    expected = engine.generate([second], 8)[0]
    scheduler = scheduler_of(engine, max_num_seqs=2)
    collect(scheduler.submit(Request(first, 4, SamplingParams())))
    tokens, end = collect(scheduler.submit(Request(second, 8, SamplingParams())))
    assert tokens == expected
    assert end.cached_tokens == 32
    stats = scheduler.stats()
    assert stats["prefix_cache_hits_total"] == 32 and stats["prefix_cache_queries_total"] == 40 + 45
    assert stats["prefix_cache_bytes"] > 0
    # a prompt that is exactly its cached blocks still runs its last token
    tokens, end = collect(scheduler.submit(Request(first[:32], 5, SamplingParams())))
    assert end.cached_tokens == 31 and tokens == engine.generate([first[:32]], 5)[0]


def test_prefix_cache_is_bounded_in_bytes(engine, scheduler_of):
    scheduler = scheduler_of(engine, prefix_cache_bytes=1)
    collect(scheduler.submit(Request(prompts_of(engine, [40])[0], 2, SamplingParams())))
    assert scheduler.stats()["prefix_cache_bytes"] == 0


def test_cancel_frees_the_slot(engine, scheduler_of):
    scheduler = scheduler_of(engine, max_num_seqs=2, max_model_len=256)
    prompts = prompts_of(engine, [10, 12, 14], seed=4)
    running = [scheduler.submit(Request(p, 200, SamplingParams(), eos_ids=frozenset())) for p in prompts[:2]]
    waiting = scheduler.submit(Request(prompts[2], 200, SamplingParams()))
    events = running[0].events(timeout=TIMEOUT)
    assert isinstance(next(events), Token)
    waiting.cancel()
    running[0].cancel()
    end = list(events)[-1]
    assert isinstance(end, Finished) and end.reason == "cancelled" and end.completion_tokens < 200
    tokens, end = collect(waiting)
    assert tokens == [] and end.reason == "cancelled"
    running[1].cancel()
    assert collect(running[1])[1].reason == "cancelled"
    stats = scheduler.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["aborted_total"] == 3


def test_logprobs_and_openai_penalties(engine, scheduler_of):
    """logprobs come from the distribution drawn from; presence/frequency penalties count generated
    tokens only, so with them greedy decoding does not repeat as it does without."""
    prompt = prompts_of(engine, [8], seed=5)[0]
    scheduler = scheduler_of(engine)
    events = list(scheduler.submit(Request(prompt, 6, SamplingParams(), logprobs=3)).events(timeout=TIMEOUT))
    for e in events[:-1]:
        assert e.top_logprobs[0] == (e.id, e.logprob) and len(e.top_logprobs) == 3
        assert e.logprob <= 0 and [v for _, v in e.top_logprobs] == sorted((v for _, v in e.top_logprobs), reverse=True)
    tokens, _ = collect(scheduler.submit(Request(prompt, 24, SamplingParams())))
    penalized, _ = collect(scheduler.submit(Request(prompt, 24, SamplingParams(), presence_penalty=2.0,
                                                    frequency_penalty=2.0)))
    assert tokens[0] == penalized[0]  # nothing generated yet: the prompt does not count
    assert len(set(penalized)) > len(set(tokens)) or len(set(penalized)) == 24


def test_submit_refuses_bad_requests_in_one_line(engine):
    scheduler = Scheduler(engine, max_queue=1, max_model_len=64)  # not started: requests stay queued
    vocab = engine.info.vocab_size
    cases = [(Request([1] * 60, 10), "prompt of 60 tokens + max_tokens 10 = 70 exceeds the maximum context of 64"),
             (Request([1, vocab], 2), f"prompt token id {vocab} is outside the vocabulary [0, {vocab})"),
             (Request([], 2), "at least one token"),
             (Request([1], 0), "max_tokens must be an integer >= 1, got 0"),
             (Request([1], 2, SamplingParams(top_p=0)), "top_p must be in (0, 1], got 0"),
             (Request([1], 2, logprobs=21), "logprobs must be an integer in [0, 20], got 21"),
             (Request([1], 2, presence_penalty=3.0), "presence_penalty must be a number in [-2, 2], got 3.0")]
    for request, message in cases:
        with pytest.raises((OptionError, EngineError), match=None) as info:
            scheduler.submit(request)
        assert message in str(info.value) and "\n" not in str(info.value)
    handle = scheduler.submit(Request([1], 2))
    with pytest.raises(QueueFull, match="max_queue 1"):
        scheduler.submit(Request([1], 2))
    with pytest.raises(OptionError, match=r"max_model_len must be an integer in \[2, 256\]"):
        Scheduler(engine, max_model_len=10_000)
    scheduler.close()
    assert isinstance(next(handle.events(timeout=TIMEOUT)), Failed)


class _Faulty(Engine):
    """Steps as `inner` does until its ragged step number `fail_at`, which raises."""

    def __init__(self, inner: Engine, fail_at: int):
        self.inner, self.info, self.fail_at, self.steps = inner, inner.info, fail_at, 0

    def _step(self, *args):
        return self.inner.step(*args)

    def step_ragged(self, *args, **kw):
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("device lost\nsecond line")
        return super().step_ragged(*args, **kw)


def test_engine_failure_fails_every_request(engine):
    scheduler = Scheduler(_Faulty(engine, fail_at=4), max_num_seqs=2)  # step 1 is the warm-up
    scheduler.start()
    handles = [scheduler.submit(Request(p, 20, SamplingParams())) for p in prompts_of(engine, [5, 6, 7], seed=6)]
    ends = [collect(h)[1] for h in handles]
    assert all(isinstance(e, Failed) and e.message == "engine failed: device lost" for e in ends)
    assert scheduler.failure == "engine failed: device lost"
    with pytest.raises(EngineError, match="engine failed: device lost"):
        scheduler.submit(Request([1], 2))
    assert scheduler.stats()["running"] == 0
    scheduler.close()


def test_close_fails_requests_in_flight(engine):
    scheduler = Scheduler(engine, max_num_seqs=1)
    scheduler.start()
    handles = [scheduler.submit(Request(p, 200, SamplingParams())) for p in prompts_of(engine, [5, 6], seed=7)]
    assert isinstance(next(handles[0].events(timeout=TIMEOUT)), Token)
    assert scheduler.ready
    scheduler.close()
    assert collect(handles[0])[1] == Failed("server shutting down")
    assert collect(handles[1])[1] == Failed("server shutting down")
    with pytest.raises(EngineError, match="server shutting down"):
        scheduler.submit(Request([1], 2))
