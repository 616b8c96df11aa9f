"""Token selection matches Hugging Face `generate` and is reproducible.

- process_logits gives the logits transformers' own processors give (repetition penalty,
  temperature, top-k, top-p, in generate's order) over a grid of settings: same -inf pattern,
  same finite values;
- greedy decoding is the argmax of the penalized logits and leaves the generator alone;
- the same seed gives the same tokens, another seed other tokens;
- sampled tokens follow softmax(process_logits) and are never removed ones;
- SamplingParams.check names the bad field in one line;
- process_logits and next_tokens leave their input untouched.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dscompile.errors import OptionError
from dscompile.runtime.sampling import SamplingParams, make_generator, next_tokens, process_logits

V = 50
# per row: repeats (penalized once), ids at both signs of the logits, and an empty history
SEEN = [[3, 7, 7, 12, 3, 40, 0, 49, 21], [5, 18, 33], []]


def _logits(batch: int = 3, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    """Fixed random logits [batch, V] with no exact zeros."""
    x = torch.randn(batch, V, generator=torch.Generator().manual_seed(seed)) * scale
    return torch.where(x == 0, torch.full_like(x, 0.5), x)


def _hf(logits: torch.Tensor, seen: list[list[int]], p: SamplingParams, sample: bool = True) -> torch.Tensor:
    """transformers' processors, added under the conditions and in the order generate uses."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)))
    if sample:
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(p.temperature)))
        if p.top_k != 0:
            procs.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            procs.append(TopPLogitsWarper(p.top_p))
    # histories of unequal length, padded with V: an id the penalty processor drops
    width = max(len(s) for s in seen)
    ids = torch.tensor([s + [V] * (width - len(s)) for s in seen], dtype=torch.int64)
    return procs(ids, logits.clone())


GRID = list(itertools.product([0.5, 1.0, 1.7], [0, 1, 5, 50, 100], [0.3, 0.9, 1.0], [1.0, 1.3, 0.7]))


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", GRID)
def test_process_logits_matches_transformers(temperature, top_k, top_p, penalty):
    logits = _logits()
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    ours, ref = process_logits(logits, SEEN, p), _hf(logits, SEEN, p)
    assert ours.dtype == torch.float32 and ours.shape == (3, V)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), "different tokens removed"
    assert not torch.isposinf(ours).any() and (~torch.isinf(ours)).any(dim=-1).all()
    finite = ~torch.isinf(ref)
    assert torch.allclose(ours[finite], ref[finite], rtol=1e-6, atol=1e-6)


def test_tiny_top_p_keeps_the_most_likely_token():
    logits = _logits()
    p = SamplingParams(temperature=1.0, top_p=1e-9)
    ours = process_logits(logits, SEEN, p)
    assert torch.equal(torch.isinf(ours), torch.isinf(_hf(logits, SEEN, p)))
    assert torch.equal(torch.isfinite(ours).sum(-1), torch.ones(3, dtype=torch.int64))
    assert torch.equal(ours.argmax(-1), logits.argmax(-1))


def test_greedy_is_argmax_of_penalized_logits():
    logits = _logits(scale=1.0, seed=1)
    # each row has seen its own best token, so a penalty can move the argmax
    seen = [[int(i)] + s for i, s in zip(logits.argmax(-1), SEEN)]
    generator = make_generator(SamplingParams())
    state = generator.get_state()
    moved = False
    for penalty in (1.0, 1.3, 3.0, 0.7):
        p = SamplingParams(temperature=0.0, top_k=1, top_p=0.3, repetition_penalty=penalty)
        expected = _hf(logits, seen, p, sample=False).argmax(-1)
        got = next_tokens(logits, seen, p, generator)
        assert got.dtype == torch.int64 and torch.equal(got, expected)
        moved |= not torch.equal(got, logits.argmax(-1))
        assert torch.equal(next_tokens(logits, seen, p, torch.Generator().manual_seed(123)), got)
    assert moved, "no penalty changed the argmax: the test does not exercise it"
    assert torch.equal(generator.get_state(), state), "greedy decoding consumed random numbers"


def _draws(params: SamplingParams, logits: torch.Tensor, n: int = 50) -> list[list[int]]:
    generator = make_generator(params)
    return [next_tokens(logits, None, params, generator).tolist() for _ in range(n)]


def test_same_seed_same_tokens_other_seed_other_tokens():
    flat = _logits(batch=2, scale=0.1, seed=2)
    p = SamplingParams(temperature=1.0, seed=7)
    first = _draws(p, flat)
    assert _draws(p, flat) == first
    assert _draws(SamplingParams(temperature=1.0, seed=8), flat) != first
    assert _draws(SamplingParams(temperature=1.0), flat) == _draws(SamplingParams(temperature=1.0, seed=0), flat)


def test_sampler_draws_from_filtered_distribution():
    n = 20000
    logits = _logits(batch=1, scale=1.5, seed=3)
    seen = [SEEN[0]]
    p = SamplingParams(temperature=0.8, top_k=12, top_p=0.9, repetition_penalty=1.3, seed=11)
    target = torch.softmax(process_logits(logits, seen, p), dim=-1)[0]
    unfiltered = torch.softmax(logits / p.temperature, dim=-1)[0]
    kept = target > 0
    assert 1 < int(kept.sum()) < 12, "the filters should remove part of the top-k"
    assert float((target - unfiltered).abs().max()) > 0.05, "filtering should change the distribution"
    tokens = next_tokens(logits.expand(n, V), seen * n, p, make_generator(p))
    assert tokens.shape == (n,) and tokens.dtype == torch.int64
    assert bool(kept[tokens].all()), "drew a removed token"
    freq = torch.bincount(tokens, minlength=V).double() / n
    assert float((freq - target.double()).abs().max()) < 0.02


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("repetition_penalty", 0.0),
     ("seed", -1)],
)
def test_check_names_the_bad_field(field, value):
    with pytest.raises(OptionError) as err:
        SamplingParams(**{field: value}).check()
    message = str(err.value)
    assert message.startswith(f"{field} must be ") and "\n" not in message
    assert str(value) in message


def test_check_accepts_valid_settings():
    SamplingParams().check()
    SamplingParams(temperature=0.7, top_p=1.0, top_k=40, repetition_penalty=0.5, seed=2**63).check()


def test_input_is_not_modified():
    logits = _logits()
    before = logits.clone()
    for p in (
        SamplingParams(temperature=0.5, top_k=5, top_p=0.5, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, top_k=5, top_p=0.5),  # no step before the filters copies
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(repetition_penalty=1.3),
    ):
        process_logits(logits, SEEN, p)
        next_tokens(logits, SEEN, p, make_generator(p))
        assert torch.equal(logits, before), p
