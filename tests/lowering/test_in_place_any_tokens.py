"""The in-place graph made for any number of new tokens (lowering/in_place.py `any_new_tokens`) and the
quantized engines that run every step through it (runtime/ort_engine.py, "Quantized engines").

- On a float32 decode graph (exact comparisons): steps of S in {1, 3, 7} new tokens after P in {0, 5}
  cached ones, B = 2 with rows at different write indices, give the contract decode graph's logits and
  cache rows; the one-token variant, given the same steps, differs (its new tokens see each other's
  future), so the comparison would catch a missing causal fix.
- A graph where something else reads a cache input's shape is refused in one line.
- An int4 engine (one layer, ~5 s to export): the manifest says `new_tokens: "any"`, its one session is
  the in-place graph, greedy generation gives the tokens of the same OUT run through the contract's
  decode graph (the form an export without the in-place graph runs), and a prefill into a held cache
  never changes it. ~15 s in all.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from dscompile.exporter.export import export_checkpoint
from dscompile.exporter.options import ExportOptions
from dscompile.lowering import LoweringError
from dscompile.lowering.in_place import in_place_decode
from dscompile.runtime.contract import position_ids
from dscompile.runtime.ort_cache import OrtCapacityCache
from dscompile.runtime.ort_engine import OrtEngine
from dscompile.tolerance import bound as tolerance_bound
from helpers import assert_close


def _close(got, want, what: str) -> None:
    assert_close(torch.from_numpy(np.ascontiguousarray(got)), torch.from_numpy(np.ascontiguousarray(want)), what=what)


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def graphs(small_export, tmp_path_factory):
    """(contract decode, any-S in-place, one-token in-place) sessions over a copy of the float32 OUT."""
    out = tmp_path_factory.mktemp("anyS") / "out"
    shutil.copytree(small_export, out)
    in_place_decode(out / "decode.onnx", out / "any.onnx", any_new_tokens=True)
    in_place_decode(out / "decode.onnx", out / "one.onnx")
    return out, _session(out / "decode.onnx"), _session(out / "any.onnx"), _session(out / "one.onnx")


@pytest.mark.parametrize("P", [0, 5])
@pytest.mark.parametrize("S", [1, 3, 7])
def test_any_new_tokens_matches_the_contract_decode_graph(graphs, S, P):
    _, contract, any_s, one = graphs
    B, T = 2, 16
    rng = np.random.default_rng(10 * S + P)
    past = {i.name: i.shape[2] for i in contract.get_inputs() if i.name.startswith("past.")}
    vocab = contract.get_outputs()[0].shape[2]
    # row 1 holds P - 2 real tokens (left padding): its write index is still P, its mask has zeros
    mask = np.ones((B, P + S), dtype=np.int64)
    mask[1, : min(P, 2)] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, P:]
    feeds = {"input_ids": rng.integers(0, vocab, (B, S)), "position_ids": positions, "attention_mask": mask,
             **{name: rng.standard_normal((B, P, width)).astype(np.float32) for name, width in past.items()}}
    want = contract.run(None, feeds)
    buffers = {name: np.zeros((B, T, width), np.float32) for name, width in past.items()}
    for name, b in buffers.items():
        b[:, :P] = feeds[name]
        b[:, P + S:] = rng.standard_normal((B, T - P - S, past[name]))  # stale rows beyond: masked
    wide = np.zeros((B, T), np.int64)
    wide[:, : P + S] = mask
    in_place = {**feeds, "attention_mask": wide, "write_index": np.full(B, P, np.int64), **buffers}
    got = any_s.run(None, in_place)
    _close(got[0], want[0], f"logits, S={S} P={P}")
    for name, g, w in zip(past, got[1:], want[1:]):
        assert g.shape == (B, T, w.shape[2])
        _close(g[:, : P + S], w, f"{name} rows, S={S} P={P}")
    if S > 1:  # without the causal fix, the new tokens see each other's future: the logits move
        wrong = one.run(None, in_place)[0]
        logits_bound = tolerance_bound(torch.float32, float(np.abs(want[0]).max()))
        assert np.abs(wrong - want[0]).max() > 100 * logits_bound, "the one-token graph agrees: the check cannot fail"


def test_ragged_rows_write_and_attend_at_their_own_index(graphs):
    """write_index per row: row b's S tokens go to rows [w_b, w_b + S) and see rows < w_b + j + 1 only;
    each row equals a batch-1 contract step over its own rows."""
    _, contract, any_s, _ = graphs
    T, S, lengths = 16, 3, [2, 6]
    rng = np.random.default_rng(1)
    past = {i.name: i.shape[2] for i in contract.get_inputs() if i.name.startswith("past.")}
    vocab = contract.get_outputs()[0].shape[2]
    ids = rng.integers(0, vocab, (2, S))
    buffers = {name: rng.standard_normal((2, T, width)).astype(np.float32) for name, width in past.items()}
    mask = (np.arange(T)[None] < np.array(lengths)[:, None] + S).astype(np.int64)
    got = any_s.run(None, {"input_ids": ids, "position_ids": np.array(lengths)[:, None] + np.arange(S),
                           "attention_mask": mask, "write_index": np.array(lengths, np.int64), **buffers})
    for b, n in enumerate(lengths):
        want = contract.run(None, {"input_ids": ids[b:b + 1], "position_ids": (n + np.arange(S))[None],
                                   "attention_mask": np.ones((1, n + S), np.int64),
                                   **{name: buffers[name][b:b + 1, :n] for name in past}})
        _close(got[0][b], want[0][0], f"logits of row {b}")
        for name, g, w in zip(past, got[1:], want[1:]):
            _close(g[b, : n + S], w[0], f"{name} rows of row {b}")
            # nothing written past the row's own S new rows: the rest of its buffer is as it came in
            assert np.array_equal(g[b, n + S:], buffers[name][b, n + S:]), f"{name}: row {b} wrote past {n + S}"


def test_a_graph_reading_the_cache_shape_elsewhere_is_refused(graphs, tmp_path):
    out = graphs[0]
    model = ir.load(str(out / "decode.onnx"))
    past = next(v for v in model.graph.inputs if v.name == "past.0.kv_latent")
    shape = ir.node("Shape", [past], name="another_reader")
    model.graph.append(shape)
    shape.outputs[0].name = "another_reader.out"
    model.graph.outputs.append(shape.outputs[0])
    ir.save(model, str(out / "extra.onnx"))
    with pytest.raises(LoweringError, match="another_reader .*reads a cache input other than as its length"):
        in_place_decode(out / "extra.onnx", tmp_path / "x.onnx", any_new_tokens=True)
    in_place_decode(out / "extra.onnx", out / "extra_one.onnx")  # the one-token variant does not care


# ---------------------------------------------------------------- an int4 engine


@pytest.fixture(scope="module")
def int4(one_layer_ckpt, small_limits, tmp_path_factory):
    out = tmp_path_factory.mktemp("anyS-int4") / "out"
    export_checkpoint(one_layer_ckpt, out, ExportOptions.within(small_limits, weights="int4", block_size=16))
    contract = tmp_path_factory.mktemp("anyS-int4") / "contract"  # the same OUT as an export made before
    shutil.copytree(out, contract)
    m = json.loads((contract / "manifest.json").read_text())
    del m["graphs"]["decode"]["in_place"]
    (contract / "manifest.json").write_text(json.dumps(m))
    return OrtEngine.load(out, provider="cpu"), OrtEngine.load(contract, provider="cpu")


def test_int4_engine_runs_every_step_in_place(int4, small_export):
    engine, contract = int4
    entry = engine.manifest["graphs"]["decode"]["in_place"]
    assert entry["new_tokens"] == "any" and entry["op_counts"]["TensorScatter"] == 2
    assert json.loads((small_export / "manifest.json").read_text())["graphs"]["decode"]["in_place"]["new_tokens"] == 1
    assert engine.sessions["prefill"] is engine.sessions["decode_inplace"] and len(set(map(id, engine.sessions.values()))) == 1
    assert set(contract.sessions) == {"prefill", "decode"} and engine._logits_from["decode_inplace"]
    prompts = [[3, 9, 27, 17, 5], [40, 2, 11]]
    assert engine.generate(prompts, 10) == contract.generate(prompts, 10)
    ids = torch.tensor([[3, 9, 27, 17, 5, 8, 1]])
    mask = torch.ones(1, 7, dtype=torch.int64)
    logits, cache = engine.step(ids, position_ids(mask), mask, None)
    want, _ = contract.step(ids, position_ids(mask), mask, None)
    assert isinstance(cache, OrtCapacityCache) and cache.length == 7
    assert_close(logits, want, what="int4 prefill logits, in place vs the contract graph")
    last, _ = engine.step(ids, position_ids(mask), mask, None, last_only=True)
    assert last.shape == (1, 1, engine.info.vocab_size) and torch.equal(last[:, 0], logits[:, -1])


def test_int4_prefill_after_a_held_cache_never_changes_it(int4):
    engine, contract = int4
    ids = torch.tensor([[3, 9, 27, 17]])
    _, cache = engine.step(ids, torch.arange(4)[None], torch.ones(1, 4, dtype=torch.int64), None)
    more, pos, mask = torch.tensor([[6, 7, 8]]), torch.arange(4, 7)[None], torch.ones(1, 7, dtype=torch.int64)
    la, ca = engine.step(more, pos, mask, cache)  # writes rows 4-6 of cache's own buffers
    assert ca.buffers is cache.buffers
    held = [r.clone() for r in ca.rows()]
    lb, cb = engine.step(torch.tensor([[12, 13, 14]]), pos, mask, cache)  # ca reads rows 4-6: new buffers
    assert cb.buffers is not ca.buffers
    assert all(torch.equal(h, r) for h, r in zip(held, ca.rows())), "a step changed a cache someone holds"
    _, base = contract.step(ids, torch.arange(4)[None], torch.ones(1, 4, dtype=torch.int64), None)
    for logits, token in ((la, more), (lb, torch.tensor([[12, 13, 14]]))):
        want, _ = contract.step(token, pos, mask, base)
        assert_close(logits, want, what=f"int4 logits after {token.tolist()}")
