"""What an ONNX Runtime engine opens on each provider, checked on CPU (runtime/ort_sessions.py, ort_engine.py):

- which graphs open as sessions (`session_graphs`): on CUDA and TensorRT one session, the contract's
  decode graph, serves every step (one device copy of the weights);
- the chunked step that bounds the experts a half-precision decode graph gathers per token
  (`max_step_tokens`): a step cut in chunks computes what the whole step computes;
- the TensorRT provider's options (`tensorrt_provider_options`): one profile from the manifest's
  limits in the provider's "name:d0xd1" format, an engine cache, refusal of graphs with contrib ops;
- the device bytes `inspect` reports per backend (runtime/weights.py resident_estimate).

Uses the session's smallest export (`small_export`); manifests are edited in copies.
"""

from __future__ import annotations

import copy
import json
import shutil

import onnx
import pytest
import torch

from dscompile.errors import EngineError
from dscompile.runtime.contract import DECODE, DECODE_IN_PLACE, PREFILL, position_ids
from dscompile.runtime.manifest import read_manifest
from dscompile.runtime.ort_engine import OrtEngine, provider_chain
from dscompile.runtime.ort_sessions import (GATHER_BUDGET_BYTES, max_step_tokens, session_graphs, tensorrt_cache_dir,
                                            tensorrt_provider_options)
from dscompile.runtime.weights import resident_estimate
from helpers import assert_close

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@pytest.fixture(scope="module")
def manifest(small_export):
    return read_manifest(small_export)


def test_one_session_on_gpu_two_on_cpu(manifest):
    in_place = manifest["graphs"][DECODE]["in_place"]["file"]
    assert session_graphs(manifest, CPU) == {PREFILL: "prefill.onnx", DECODE_IN_PLACE: in_place}
    for provider in (CUDA, TRT):
        assert session_graphs(manifest, provider) == {PREFILL: "decode.onnx", DECODE: "decode.onnx"}
    plain = copy.deepcopy(manifest)
    del plain["graphs"][DECODE]["in_place"]
    assert session_graphs(plain, CPU) == {PREFILL: "prefill.onnx", DECODE: "decode.onnx"}
    quantized = dict(manifest, quantization={"scheme": "int4"})
    assert session_graphs(quantized, CPU) == {PREFILL: "decode.onnx", DECODE: "decode.onnx"}
    # a quantized export's in-place graph takes any number of new tokens: its one CPU session runs every step
    any_s = copy.deepcopy(quantized)
    any_s["graphs"][DECODE]["in_place"]["new_tokens"] = "any"
    assert session_graphs(any_s, CPU) == {PREFILL: in_place, DECODE_IN_PLACE: in_place}
    assert max_step_tokens(any_s, CPU) is None
    for provider in (CUDA, TRT):
        assert session_graphs(any_s, provider) == {PREFILL: "decode.onnx", DECODE: "decode.onnx"}


def test_engine_opens_what_the_plan_says(small_export):
    """On CPU: two sessions (prefill, in-place decode); the one-session plan, forced on CPU, gives one
    session object under both names and steps as the two-session engine does."""
    engine = OrtEngine.load(small_export, provider="cpu")
    assert set(engine.sessions) == {PREFILL, DECODE_IN_PLACE}
    assert engine.sessions[PREFILL] is not engine.sessions[DECODE_IN_PLACE] and engine.max_step_tokens is None


def _gather_manifest(manifest, dtype="bfloat16", K=6, D=2048, I=1408):
    m = copy.deepcopy(manifest)
    m["dtype"] = dtype
    m["graphs"][DECODE]["moe_lowering"] = "gather"
    m["model"].update(num_experts_per_tok=K, hidden_size=D, moe_intermediate_size=I)
    return m


def test_gathered_experts_bound_the_step_on_gpu(manifest):
    """DeepSeek-V2-Lite widths in bfloat16: 6 x 3 x 2048 x 1408 x 2 bytes = 104 MB gathered per token
    and layer; 2 GiB hold 20 tokens. On CPU (prefill graph for prefills) and for the fused MoE op
    (float32) nothing is cut."""
    m = _gather_manifest(manifest)
    per_token = 6 * 3 * 2048 * 1408 * 2
    assert max_step_tokens(m, CUDA) == GATHER_BUDGET_BYTES // per_token == 20
    assert max_step_tokens(m, TRT) == 20
    assert max_step_tokens(_gather_manifest(manifest, "float32"), CUDA) == 10
    assert max_step_tokens(m, CPU) is None
    assert max_step_tokens(manifest, CUDA) is None  # float32: com.microsoft.MoE, nothing gathered
    huge = _gather_manifest(manifest, K=8, D=7168, I=2048)  # V3: 705 MB per token and layer: 3 tokens a step
    assert max_step_tokens(huge, CUDA) == 3
    tiny_budget = _gather_manifest(manifest, K=8, D=7168, I=20480)  # over the budget for one token: still 1
    assert max_step_tokens(tiny_budget, CUDA) == 1


def test_a_step_in_chunks_computes_the_whole_step(small_export):
    """Prefill of 7 tokens (batch 2, the second row left-padded by 2) then 3 tokens, with steps cut into
    chunks of 3, against the same engine uncut: logits and cache agree to float32 tolerance at every
    real position. (A padded position attends to nothing real, so what it computes depends on which
    keys the step holds; nothing reads it.)"""
    whole = OrtEngine.load(small_export, provider="cpu")
    cut = OrtEngine.load(small_export, provider="cpu")
    cut.max_step_tokens = 3
    steps, real_step = [], cut._step
    cut._step = lambda ids, *rest, **kw: steps.append(int(ids.shape[1])) or real_step(ids, *rest, **kw)
    torch.manual_seed(0)
    vocab = whole.info.vocab_size
    ids = torch.randint(1, vocab, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, :2] = 0
    mask2 = torch.cat([mask, torch.ones(2, 3, dtype=torch.int64)], dim=1)
    more = torch.randint(1, vocab, (2, 3))
    results = []
    for engine in (whole, cut):
        logits, cache = engine.step(ids, position_ids(mask), mask, None)
        logits2, cache2 = engine.step(more, position_ids(mask2)[:, -3:], mask2, cache)
        results.append((logits, logits2, [t for layer in cache2.layers for t in layer]))
    (ref1, ref2, ref_cache), (got1, got2, got_cache) = results
    assert steps == [7, 3, 3, 1, 3]  # the 7-token step ran as 3 + 3 + 1; the 3-token step whole
    assert got1.shape == (2, 7, vocab) and got2.shape == (2, 3, vocab)
    real = mask2.bool()
    assert_close(got1[0], ref1[0], what="prefill logits in chunks, row 0")
    assert_close(got1[1, 2:], ref1[1, 2:], what="prefill logits in chunks, row 1 (real tokens)")
    assert_close(got2, ref2, what="the next step's logits")
    for got, ref in zip(got_cache, ref_cache):
        assert got.shape == ref.shape == (2, 10, got.shape[-1])
        assert_close(got[real], ref[real], what="cache at real positions")


def test_tensorrt_options_give_one_profile_from_the_limits(manifest, tmp_path):
    limits = manifest["limits"]
    B, S, T = limits["max_batch"], limits["max_prompt_tokens"], limits["max_context"]
    C, R = manifest["model"]["kv_lora_rank"], manifest["model"]["qk_rope_head_dim"]
    fp16 = _gather_manifest(manifest, "float16")
    fp16["graphs"][DECODE]["op_counts"] = {"MatMul": 3, "Gather": 2}
    options = tensorrt_provider_options(fp16, tmp_path / "cache")
    profiles = {k: dict(item.split(":") for item in options[f"trt_profile_{k}_shapes"].split(","))
                for k in ("min", "opt", "max")}
    names = [io["name"] for io in manifest["graphs"][DECODE]["inputs"]]
    assert all(list(p) == names for p in profiles.values())  # every input, once, in graph order
    assert profiles["min"]["input_ids"] == "1x1" and profiles["max"]["input_ids"] == f"{B}x{S}"
    assert profiles["opt"]["input_ids"] == f"{B}x1"  # tuned for decode
    assert profiles["min"]["attention_mask"] == "1x1" and profiles["max"]["attention_mask"] == f"{B}x{T}"
    assert profiles["min"]["past.0.kv_latent"] == f"1x0x{C}"  # a first step has no past
    assert profiles["max"]["past.0.k_rope"] == f"{B}x{T - 1}x{R}"
    p_opt = T // 2
    assert profiles["opt"]["past.0.kv_latent"] == f"{B}x{p_opt}x{C}" and profiles["opt"]["attention_mask"] == \
        f"{B}x{p_opt + 1}"
    assert options["trt_engine_cache_enable"] == "True"
    assert options["trt_engine_cache_path"] == str(tmp_path / "cache") and options["trt_fp16_enable"] == "True"
    assert "trt_bf16_enable" not in options
    bf16 = dict(fp16, dtype="bfloat16")
    assert tensorrt_provider_options(bf16, tmp_path)["trt_bf16_enable"] == "True"
    assert dict(provider_chain([TRT, CUDA, CPU], tensorrt=options))[TRT] == options


def test_tensorrt_provider_refused_for_contrib_ops(manifest, tmp_path):
    """float32 graphs run com.microsoft.MoE, which TensorRT does not import: one line, naming it."""
    assert "com.microsoft.MoE" in manifest["graphs"][DECODE]["op_counts"]
    with pytest.raises(EngineError, match=r"cannot run decode.onnx whole: it holds com.microsoft.MoE") as err:
        tensorrt_provider_options(manifest, tmp_path)
    assert "\n" not in str(err.value) and "--provider cuda" in str(err.value)


def test_tensorrt_cache_is_per_export(small_export, tmp_path, monkeypatch):
    monkeypatch.setenv("DSCOMPILE_HOME", str(tmp_path))
    other = tmp_path / "other"
    shutil.copytree(small_export, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["limits"]["max_context"] += 1
    (other / "manifest.json").write_text(json.dumps(manifest))
    a, b = tensorrt_cache_dir(small_export), tensorrt_cache_dir(other)
    assert a.parent == b.parent == tmp_path / "ort-tensorrt" and a != b


def _bytes_of(path) -> set[tuple[int, int]]:
    model = onnx.load(str(path), load_external_data=False)
    regions = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            regions.add((int(info.get("offset", 0)), int(info["length"])))
    return regions


def _union(regions) -> int:
    covered = bytearray(max(o + n for o, n in regions))
    for o, n in regions:
        covered[o:o + n] = b"\1" * n
    return sum(covered)


def test_inspect_reports_one_device_copy_on_cuda_and_for_the_tensorrt_engine(small_export, tmp_path):
    """onnxruntime-cuda: the bytes of the decode graph's initializers (one session); the TensorRT engine:
    the same (one engine, the decode graph, with two profiles), halved for an fp32 export built as fp16."""
    manifest = read_manifest(small_export)
    decode, prefill = _bytes_of(small_export / "decode.onnx"), _bytes_of(small_export / "prefill.onnx")
    report = resident_estimate(small_export, manifest)
    assert report["onnxruntime-cuda"]["bytes"] == _union(decode)
    assert report["onnxruntime-cuda"]["bytes"] < _union(decode) + _union(prefill)  # what two sessions held
    assert "onnxruntime-tensorrt" not in report  # com.microsoft.MoE: ORT's TensorRT provider refuses it
    assert "tensorrt" not in report
    trt = dict(manifest, target="tensorrt")
    assert resident_estimate(small_export, trt)["tensorrt"]["bytes"] == _union(decode)
    built_half = dict(trt, tensorrt={"precision": "fp16"})
    assert resident_estimate(small_export, built_half)["tensorrt"]["bytes"] == _union(decode) // 2
    from dscompile.inspect import inspect

    assert inspect(small_export)["resident_estimate"]["onnxruntime-cuda"]["bytes"] == _union(decode)
