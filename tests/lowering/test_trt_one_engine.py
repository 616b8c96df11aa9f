"""The one TensorRT engine (lowering/tensorrt/build.py, runtime/trt_engine.py), checked without TensorRT
on a real `--target tensorrt` export of a tiny checkpoint:

- the two optimization profiles computed from its decode graph: ranges, opt points with T = P + S,
  the prefill profile's S bounded by the gathered experts' budget (at the engine's precision);
- the build's checks all pass on it, up to the TensorRT import;
- TrtEngine's steps (plan, profile choice, range checks, chunk inputs) with only the TensorRT
  execution swapped for ONNX Runtime running the same decode graph on CPU: chunked steps give the
  logits and cache of whole steps of the ONNX Runtime engine.

Tests that build or run a real engine are in test_tensorrt.py (they skip without TensorRT).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import assert_close

from dscompile.errors import EngineError
from dscompile.lowering.tensorrt.build import build_engines, compute_profiles, read_graph_io, step_tokens, trt_section
from dscompile.runtime import ort_sessions
from dscompile.runtime.contract import KVCache, position_ids
from dscompile.runtime.manifest import read_manifest
from dscompile.runtime.ort_engine import OrtEngine
from dscompile.runtime.trt_engine import PROFILES, TensorRTUnavailable, TrtEngine, _Profile

LIMITS = dict(max_batch=2, max_prompt_tokens=16, max_context=32)
_TORCH = {1: torch.float32, 7: torch.int64}  # ONNX elem types of a float32 export's IO


@pytest.fixture(scope="module")
def trt_out(one_layer_ckpt, tmp_path_factory):
    """A float32 `--target tensorrt` export (graphs and weights; no engine) and its manifest."""
    from dscompile.capture import Limits
    from dscompile.exporter.export import export_checkpoint
    from dscompile.exporter.options import ExportOptions

    out = tmp_path_factory.mktemp("trt-one-engine") / "out"
    export_checkpoint(one_layer_ckpt, out, ExportOptions.within(Limits(**LIMITS), target="tensorrt"))
    return out, read_manifest(out)


def _per_token(manifest, width):
    cfg = manifest["model"]
    return cfg["num_experts_per_tok"] * 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"] * width


def test_profiles_from_the_exported_decode_graph(trt_out, monkeypatch):
    out, manifest = trt_out
    assert manifest["graphs"]["decode"]["moe_lowering"] == "gather"
    io = read_graph_io(out / "decode.onnx", "decode")
    B, S, T = LIMITS["max_batch"], LIMITS["max_prompt_tokens"], LIMITS["max_context"]
    C, R = manifest["model"]["kv_lora_rank"], manifest["model"]["qk_rope_head_dim"]
    assert step_tokens(manifest, "fp32", S) == S  # a tiny model's experts fit the budget many times over
    # a budget of 5 tokens' float32 experts: the prefill profile stops at 5 (10 at half the width)
    monkeypatch.setattr(ort_sessions, "GATHER_BUDGET_BYTES", 5 * _per_token(manifest, 4) + 1)
    assert step_tokens(manifest, "fp32", S) == 5 and step_tokens(manifest, "fp16", S) == 10
    assert step_tokens(manifest, "bf16", 8) == 8  # the longest prompt bounds it too
    for chunk in (S, 5):
        profiles = compute_profiles(io, **LIMITS, step_tokens=chunk)
        assert list(profiles) == list(PROFILES) == ["prefill", "decode"]
        prefill, decode = profiles["prefill"], profiles["decode"]
        s_opt = S // 2 if chunk == S else chunk
        assert prefill["input_ids"] == prefill["position_ids"] == {"min": [1, 1], "opt": [B, s_opt], "max": [B, chunk]}
        assert prefill["attention_mask"] == {"min": [1, 1], "opt": [B, s_opt], "max": [B, T]}
        assert decode["input_ids"] == {"min": [1, 1], "opt": [B, 1], "max": [B, 1]}
        assert decode["attention_mask"] == {"min": [1, 2], "opt": [B, T // 2 + 1], "max": [B, T]}
        for name in io.inputs:  # every input of the graph, in both profiles
            assert name in prefill and name in decode
            if name.startswith("past."):
                width = C if name.endswith("kv_latent") else R
                assert prefill[name] == {"min": [1, 0, width], "opt": [B, 0, width], "max": [B, T - 1, width]}
                assert decode[name] == {"min": [1, 1, width], "opt": [B, T // 2, width], "max": [B, T - 1, width]}
        for shapes in (prefill, decode):  # opt really occurs: T = P + S
            assert shapes["attention_mask"]["opt"][1] == \
                shapes["past.0.kv_latent"]["opt"][1] + shapes["input_ids"]["opt"][1]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed here: the build would go on to build the engine")
def test_the_build_checks_a_real_export_before_tensorrt(trt_out):
    """Every check that needs no TensorRT passes on the export; the build stops at the import, writing nothing."""
    out, _ = trt_out
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        build_engines(out, precision="fp32", **LIMITS)
    assert not list(out.glob("*.engine"))


class _OrtRuns(TrtEngine):
    """TrtEngine whose TensorRT execution (`_execute`, the binding of tensors to a context) is ONNX
    Runtime running the same decode graph on CPU; the plan, the choice of profile, the range checks and
    each chunk's inputs are TrtEngine's own. Records (profile, S, P) per run."""

    def __init__(self, out, section, io):
        def torch_io(table):
            return {n: (tuple(-1 if d is None else d for d in dims), _TORCH[t]) for n, (dims, t) in table.items()}

        ranges = {name: _Profile(name, section["profiles"][name]["index"], None, section["profiles"][name]["shapes"])
                  for name in PROFILES}
        super().__init__(out, section, None, torch_io(io.inputs) | torch_io(io.outputs), list(io.inputs),
                         list(io.outputs), ranges, torch.device("cpu"))
        self.session = ort.InferenceSession(str(out / section["onnx"]), providers=["CPUExecutionProvider"])
        self.runs = []

    def _execute(self, profile, feeds):
        self.runs.append((profile.name, int(feeds["input_ids"].shape[1]), int(feeds["past.0.kv_latent"].shape[1])))
        names = [o.name for o in self.session.get_outputs()]
        values = self.session.run(names, {n: np.ascontiguousarray(t.numpy()) for n, t in feeds.items()})
        got = {n: torch.from_numpy(v) for n, v in zip(names, values)}
        present = [got[n] for n in names if n.startswith("present.")]
        return got["logits"].float(), KVCache(list(zip(present[::2], present[1::2])))


def _engine(out, chunk):
    io = read_graph_io(out / "decode.onnx", "decode")
    section = trt_section(tensorrt_version="10.15.1", precision="fp32", strongly_typed=True, **LIMITS, workspace_gb=1,
                          timing_cache_path=None, onnx_file="decode.onnx", step_tokens=chunk,
                          profiles=compute_profiles(io, **LIMITS, step_tokens=chunk))
    return _OrtRuns(out, section, io)


def test_chunked_steps_on_the_two_profiles_compute_whole_steps(trt_out):
    """A 7-token prompt (batch 2, the second row left-padded by 2) then 3 tokens then 1, through the
    engine with step_tokens 3, against ONNX Runtime's engine on the same export, uncut (its prefill
    graph for the first two steps): logits at real positions and the cache agree to float32 tolerance."""
    out, _ = trt_out
    cut, whole = _engine(out, 3), OrtEngine.load(out, provider="cpu")
    assert cut.max_step_tokens == 3 and cut.info == whole.info
    torch.manual_seed(0)
    vocab = whole.info.vocab_size
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, :2] = 0
    mask2 = torch.cat([mask, torch.ones(2, 3, dtype=torch.int64)], dim=1)
    mask3 = torch.cat([mask2, torch.ones(2, 1, dtype=torch.int64)], dim=1)
    steps = [(torch.randint(1, vocab, (2, 7)), position_ids(mask), mask),
             (torch.randint(1, vocab, (2, 3)), position_ids(mask2)[:, -3:], mask2),
             (torch.randint(1, vocab, (2, 1)), position_ids(mask3)[:, -1:], mask3)]
    results = []
    for engine in (whole, cut):
        cache, logits = None, []
        for ids, pos, m in steps:
            out_logits, cache = engine.step(ids, pos, m, cache)
            logits.append(out_logits)
        results.append((logits, [t for layer in cache.layers for t in layer]))
    assert cut.runs == [("prefill", 3, 0), ("prefill", 3, 3), ("decode", 1, 6),  # the prompt: 3 + 3 + 1
                        ("prefill", 3, 7), ("decode", 1, 10)]
    (ref, ref_cache), (got, got_cache) = results
    assert [t.shape for t in got] == [(2, 7, vocab), (2, 3, vocab), (2, 1, vocab)]
    assert_close(got[0][0], ref[0][0], what="prompt logits in chunks, row 0")
    assert_close(got[0][1, 2:], ref[0][1, 2:], what="prompt logits in chunks, row 1 (real tokens)")
    assert_close(got[1], ref[1], what="3-token step on the prefill profile")
    assert_close(got[2], ref[2], what="decode step on the decode profile")
    real = mask3.bool()
    for g, r in zip(got_cache, ref_cache):
        assert g.shape == r.shape == (2, 11, g.shape[-1])
        assert_close(g[real], r[real], what="cache at real positions")

    # last_only: the last new token's logits, the chunks before it run for the cache alone
    cut.runs.clear()
    last, cache = cut.step(*steps[0], None, last_only=True)
    assert last.shape == (2, 1, vocab) and cache.length == 7 and len(cut.runs) == 3
    assert_close(last, got[0][:, -1:], what="last_only logits")


def test_shapes_outside_a_profile_are_refused(trt_out):
    out, _ = trt_out
    engine = _engine(out, 4)
    ids = torch.ones(3, 2, dtype=torch.int64)  # 3 rows, the engine takes 2
    with pytest.raises(EngineError, match=r"prefill profile: input_ids dim 0 is 3, the engine was built for 1\.\.2"):
        engine.step(ids, torch.arange(2).expand(3, 2), torch.ones(3, 2, dtype=torch.int64), None)
    assert engine.runs == []
