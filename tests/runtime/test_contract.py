"""The engine contract (runtime/contract.py): its public names, the graph a step runs, positions
from a left-padded mask, the inputs of a step; and the checks `Engine.step` makes before any
backend runs (a backend implements `_step` only and cannot skip them).

Shapes: B batch, S new tokens, P past tokens, V vocab, C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

import os

import pytest
import torch

from dscompile.errors import EngineError
from dscompile.runtime.contract import (DECODE, DECODE_IN_PLACE, PHASES, PREFILL, WRITE_INDEX, EngineInfo, KVCache,
                                        cache_names, choose_graph, io_names, next_step_inputs, position_ids,
                                        random_step_inputs, step_inputs)
from dscompile.runtime.engine import Engine
from dscompile.runtime.weights import WeightsFile

INFO = EngineInfo(num_layers=2, kv_lora_rank=8, qk_rope_head_dim=4, vocab_size=50, max_positions=32,
                  cache_dtype=torch.float32)


def test_names_are_the_documented_interface():
    inputs, outputs = io_names(2)
    assert inputs == ["input_ids", "position_ids", "attention_mask", "past.0.kv_latent", "past.0.k_rope",
                      "past.1.kv_latent", "past.1.k_rope"]
    assert outputs == ["logits", "present.0.kv_latent", "present.0.k_rope", "present.1.kv_latent",
                       "present.1.k_rope"]
    assert cache_names("past", 1) == ["past.0.kv_latent", "past.0.k_rope"]
    assert PHASES == ("prefill", "decode") == (PREFILL, DECODE)
    assert WRITE_INDEX == "write_index" and DECODE_IN_PLACE == "decode_inplace"


def test_choose_graph():
    assert choose_graph(1, 5) == "decode"
    assert choose_graph(1, 5, in_place=True) == "decode_inplace"
    assert choose_graph(1, 0, in_place=True) == "prefill"  # a one-token prompt: nothing cached yet
    assert choose_graph(7, 5, in_place=True) == "prefill"  # chunked prefill against a cache


def test_positions_from_a_left_padded_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1],
                         [1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2],
                                           [0, 1, 2, 3, 4],
                                           [0, 0, 0, 0, 0]]
    # the last two columns after a cache of 3 real tokens: the first new real token is at 3 in both
    # rows (row 0's padding column repeats the position before it; it is never attended)
    cached = torch.tensor([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]])
    assert position_ids(cached, 2).tolist() == [[2, 3], [3, 4]]


def test_step_inputs_left_pad_prompts():
    ids, pos, mask = step_inputs([[7, 8, 9], [5]], pad_token_id=1)
    assert ids.tolist() == [[7, 8, 9], [1, 1, 5]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    for t in (ids, pos, mask):
        assert t.dtype == torch.int64 and t.shape == (2, 3)


def test_step_inputs_after_a_cache_and_the_next_step():
    inputs = random_step_inputs(vocab=50, batch=2, tokens=3, past=4, seed=0, padding=[0, 2])
    ids, pos, mask = inputs
    assert ids.shape == pos.shape == (2, 3) and mask.shape == (2, 7)
    assert all(t.dtype == torch.int64 for t in inputs) and int(ids.max()) < 50
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 1]]
    assert pos.tolist() == [[4, 5, 6], [3, 3, 4]]  # row 1: two padding columns, then position 4
    assert torch.equal(ids, random_step_inputs(50, 2, 3, past=4, seed=0).input_ids)  # seeded
    ids2, pos2, mask2 = next_step_inputs(torch.tensor([3, 4]), inputs)
    assert ids2.tolist() == [[3], [4]] and pos2.tolist() == [[7], [5]] and mask2.shape == (2, 8)
    assert int(mask2[:, -1].min()) == 1


def test_empty_cache_layout():
    cache = KVCache.empty(INFO, batch=3)
    assert cache.length == 0 and len(cache.layers) == 2
    assert [tuple(t.shape) for t in cache.layers[0]] == [(3, 0, 8), (3, 0, 4)]


# ---------------------------------------------------------------- the checks every backend gets


class _Backend(Engine):
    """A backend that implements only its part of a step and counts the steps it ran."""

    def __init__(self, weights: WeightsFile | None = None):
        self.info, self.weights, self.ran = INFO, weights, 0

    def _step(self, input_ids, position_ids, attention_mask, cache):
        self.ran += 1
        B, S = input_ids.shape
        return torch.zeros(B, S, INFO.vocab_size), KVCache.empty(INFO, B)


def test_a_backend_gets_the_input_checks():
    engine = _Backend()
    ids, pos, mask = random_step_inputs(50, 2, 3)
    engine.step(ids, pos, mask, None)
    for bad in ((ids, pos[:, :2], mask), (ids, pos, mask[:, :2]), (ids[0], pos, mask), (ids + 50, pos, mask)):
        with pytest.raises(EngineError):
            engine.step(*bad, None)
    with pytest.raises(EngineError, match="exceed the engine's maximum of 32"):
        engine.step(*random_step_inputs(50, 1, 33), None)
    assert engine.ran == 1


def test_a_backend_refuses_a_changed_weights_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(8192))
    weights = WeightsFile.open(tmp_path, {"weights": {"file": "weights.bin", "bytes": 8192}})
    engine = _Backend(weights)
    engine.step(*random_step_inputs(50, 1, 2), None)
    with open(path, "r+b") as f:  # written in place, as `cp` over it would
        f.write(b"\x01" * 16)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # whatever the clock's resolution
    with pytest.raises(EngineError, match="changed on disk"):
        engine.step(*random_step_inputs(50, 1, 2), None)
    assert engine.ran == 1
    weights.close()
