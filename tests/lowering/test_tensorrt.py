"""TensorRT backend: engine building (lowering/tensorrt/build.py) and running (runtime/trt_engine.py).

Everything that needs no TensorRT (options, profiles, the IO contract, the compatibility gate, the
manifest section, input checks) runs everywhere. Tests that build or run real engines are marked
`tensorrt` and skip where TensorRT or a CUDA GPU is missing.
"""

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dscompile.lowering.tensorrt.build import (
    TensorRTBuildError,
    _build_one,
    build_engines,
    builder_flags,
    compute_profiles,
    network_mode,
    read_graph_io,
    trt_section,
    validate_options,
)
from dscompile.runtime.contract import EngineInfo, choose_graph
from dscompile.errors import EngineError, OptionError
from dscompile.runtime.trt_engine import (
    TensorRTUnavailable,
    TrtEngine,
    check_profile,
    engine_info_from_io,
    read_trt_section,
    require_tensorrt,
    torch_dtype,
)
from dscompile.runtime.engine import step_plan

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
SKIP_REASON = "TensorRT is not installed (needs NVIDIA's package index and a CUDA GPU)"
needs_trt = pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()), reason=SKIP_REASON)
no_trt = pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here: the 'unavailable' path cannot be shown")

V, C, R, LAYERS = 32, 4, 2, 2


def _toy_graph(graph: str, dtype=TensorProto.FLOAT, decode_static_s=False, extra_node=None):
    """A tiny model that follows the engine contract: embeddings -> logits, new latents appended to the cache."""
    s_dim = 1 if decode_static_s else "S"
    np_dtype = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}[dtype]
    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(rng.standard_normal((V, C)).astype(np_dtype), "emb"),
        numpy_helper.from_array(rng.standard_normal((V, R)).astype(np_dtype), "emb_rope"),
        numpy_helper.from_array(rng.standard_normal((C, V)).astype(np_dtype), "head"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
        helper.make_node("Gather", ["emb_rope", "input_ids"], ["hr"], name="embed_rope"),
        helper.make_node("MatMul", ["h", "head"], ["logits_raw"], name="lm_head"),
        helper.make_node("Cast", ["logits_raw"], ["logits"], to=TensorProto.FLOAT, name="to_f32"),
    ]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", s_dim]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["B", s_dim]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", s_dim, V])]
    for i in range(LAYERS):
        for kind, width, new in (("kv_latent", C, "h"), ("k_rope", R, "hr")):
            inputs.append(helper.make_tensor_value_info(f"past.{i}.{kind}", dtype, ["B", "P", width]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", dtype, ["B", "T", width]))
            nodes.append(helper.make_node("Concat", [f"past.{i}.{kind}", new], [f"present.{i}.{kind}"], axis=1,
                                          name=f"cache_{i}_{kind}"))
    if extra_node is not None:
        nodes.append(extra_node)
    model = helper.make_model(helper.make_graph(nodes, graph, inputs, outputs, init),
                              opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def _write_out(tmp_path, **kw):
    for g in ("prefill", "decode"):
        onnx.save(_toy_graph(g, **kw), str(tmp_path / f"{g}.onnx"))
    return tmp_path


# -- options and profiles -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(precision="int8"), "--precision"),
        (dict(max_batch=0), "--max-batch"),
        (dict(max_prompt_tokens=-1), "--max-prompt-tokens"),
        (dict(max_context=100, max_prompt_tokens=200), "--max-context"),
        (dict(workspace_gb=0), "--workspace-gb"),
    ],
)
def test_options_are_refused_with_the_option_named(kwargs, option):
    args = dict(precision="fp16", max_batch=4, max_prompt_tokens=128, max_context=1024, workspace_gb=4.0) | kwargs
    with pytest.raises(OptionError) as e:
        validate_options(**args)
    assert str(e.value).startswith(option) and "\n" not in str(e.value)


def test_build_refuses_bad_options_before_touching_out(tmp_path):
    with pytest.raises(OptionError, match="--max-context"):
        build_engines(tmp_path / "does-not-exist", max_prompt_tokens=64, max_context=32)


def test_profiles_from_onnx_inputs(tmp_path):
    onnx.save(_toy_graph("decode"), str(tmp_path / "decode.onnx"))
    io = read_graph_io(tmp_path / "decode.onnx", "decode")
    assert io.num_layers == LAYERS
    profiles = compute_profiles(io, max_batch=4, max_prompt_tokens=128, max_context=1024, step_tokens=128)
    assert list(profiles) == ["prefill", "decode"]  # index order
    p = profiles["prefill"]
    assert p["input_ids"] == {"min": [1, 1], "opt": [4, 64], "max": [4, 128]}
    assert p["position_ids"] == p["input_ids"]
    assert p["attention_mask"] == {"min": [1, 1], "opt": [4, 64], "max": [4, 1024]}
    assert p["past.1.kv_latent"] == {"min": [1, 0, C], "opt": [4, 0, C], "max": [4, 1023, C]}
    assert p["past.0.k_rope"] == {"min": [1, 0, R], "opt": [4, 0, R], "max": [4, 1023, R]}
    assert sorted(p) == sorted(io.inputs)
    d = profiles["decode"]
    assert d["input_ids"] == {"min": [1, 1], "opt": [4, 1], "max": [4, 1]}
    assert d["attention_mask"] == {"min": [1, 2], "opt": [4, 513], "max": [4, 1024]}
    assert d["past.0.kv_latent"] == {"min": [1, 1, C], "opt": [4, 512, C], "max": [4, 1023, C]}
    # a chunk bound below the longest prompt: S max is the chunk, tuned at a whole chunk
    chunked = compute_profiles(io, max_batch=4, max_prompt_tokens=128, max_context=1024, step_tokens=20)["prefill"]
    assert chunked["input_ids"] == {"min": [1, 1], "opt": [4, 20], "max": [4, 20]}
    for shapes in (p, d, chunked):  # opt is a point that really occurs: T = P + S
        assert shapes["attention_mask"]["opt"][1] == \
            shapes["past.0.kv_latent"]["opt"][1] + shapes["input_ids"]["opt"][1]


def test_build_refuses_a_decode_graph_with_static_s(tmp_path):
    onnx.save(_toy_graph("decode", decode_static_s=True), str(tmp_path / "decode.onnx"))
    with pytest.raises(EngineError, match=r"decode\.onnx: input_ids has a static S == 1, so the one engine cannot"):
        build_engines(tmp_path, precision="fp32", max_batch=2, max_prompt_tokens=8, max_context=16)


def test_contract_violations_name_the_tensor(tmp_path):
    model = _toy_graph("prefill")
    model.graph.input[1].name = "positions"
    onnx.save(model, str(tmp_path / "prefill.onnx"))
    with pytest.raises(EngineError, match=r"prefill\.onnx: input 'positions' is not part of the engine contract"):
        read_graph_io(tmp_path / "prefill.onnx", "prefill")
    model = _toy_graph("prefill")
    del model.graph.output[-1]  # present.1.k_rope
    onnx.save(model, str(tmp_path / "prefill.onnx"))
    with pytest.raises(EngineError, match=r"output 'present\.1\.k_rope' is missing"):
        read_graph_io(tmp_path / "prefill.onnx", "prefill")
    (tmp_path / "decode.onnx").write_bytes(b"garbage")
    with pytest.raises(EngineError, match=r"decode\.onnx: not a valid ONNX file"):
        read_graph_io(tmp_path / "decode.onnx", "decode")


def test_network_mode_per_export_dtype():
    assert network_mode(TensorProto.FLOAT, "fp32") == (True, None)
    assert network_mode(TensorProto.FLOAT16, "fp16") == (True, None)
    assert network_mode(TensorProto.FLOAT, "fp16") == (False, "FP16")
    assert network_mode(TensorProto.FLOAT, "bf16") == (False, "BF16")
    with pytest.raises(OptionError, match="--precision bf16 cannot be built from a fp16 export"):
        network_mode(TensorProto.FLOAT16, "bf16")


def test_fp32_builds_clear_tf32_unless_opted_in(tmp_path):
    """TensorRT sets BuilderFlag.TF32 by default: an fp32 build clears it, unless tf32 opts in; fp16/bf16
    builds keep their flags. The builder-config code (_build_one, with a stand-in for TensorRT's module)
    applies what builder_flags decides."""
    from unittest.mock import MagicMock

    assert builder_flags(None, "fp32") == ([], ["TF32"])
    assert builder_flags(None, "fp32", tf32=True) == (["TF32"], [])
    assert builder_flags("FP16", "fp16") == (["FP16"], []) and builder_flags(None, "bf16") == ([], [])
    for tf32 in (False, True):
        trt = MagicMock()
        builder = trt.Builder.return_value
        builder.create_network.return_value.num_inputs = 0
        config = builder.create_builder_config.return_value
        config.add_optimization_profile.side_effect = [0, 1]
        _build_one(trt, None, tmp_path / "decode.onnx", [{}, {}], True, builder_flags(None, "fp32", tf32), 1.0, None,
                   lambda _: None)
        assert config.add_optimization_profile.call_count == 2  # both profiles on the one builder config
        if tf32:
            config.set_flag.assert_called_once_with(trt.BuilderFlag.TF32)
            config.clear_flag.assert_not_called()
        else:
            config.clear_flag.assert_called_once_with(trt.BuilderFlag.TF32)
            config.set_flag.assert_not_called()
    with pytest.raises(OptionError, match="--tf32 with --precision fp16"):
        validate_options("fp16", 1, 8, 16, 1.0, tf32=True)
    from dscompile.exporter.options import ExportOptions

    with pytest.raises(OptionError, match="--tf32 is a TensorRT build option"):
        ExportOptions(tf32=True)


# -- the build gate (no TensorRT needed) ---------------------------------------------------------


def test_build_refuses_com_microsoft_ops_before_tensorrt(tmp_path):
    moe = helper.make_node("MoE", ["h"], ["moe_out"], domain="com.microsoft", name="layers.1.moe")
    _write_out(tmp_path, extra_node=moe)
    with pytest.raises(TensorRTBuildError) as e:
        build_engines(tmp_path, precision="fp32")
    msg = str(e.value)
    assert "decode.onnx: not buildable by TensorRT: com.microsoft::MoE (layers.1.moe)" in msg
    assert "domain 'com.microsoft' is not supported by TensorRT" in msg and "\n" not in msg
    assert not list(tmp_path.glob("*.engine"))


def test_the_api_counts_the_engine_the_build_writes():
    """dscompile.export(target="tensorrt") reports build_engines' messages as the stage bar it takes:
    (stage, done, total), one engine."""
    from dscompile.api import _count_engines

    calls = []
    say = _count_engines(lambda *a: calls.append(a))
    for message in ("model: parsing decode.onnx", "model: building 2 profiles (strongly typed)",
                    "model: wrote model.engine (1.0 MiB)"):
        say(message)
    assert calls == [("tensorrt", 0, 1), ("tensorrt", 1, 1)]
    assert _count_engines(None) is None


def test_build_refuses_missing_graph(tmp_path):
    onnx.save(_toy_graph("prefill"), str(tmp_path / "prefill.onnx"))
    with pytest.raises(EngineError, match=r"decode\.onnx: no such ONNX file"):
        build_engines(tmp_path, precision="fp32")


@no_trt
def test_build_without_tensorrt_says_what_to_install(tmp_path):
    _write_out(tmp_path)
    with pytest.raises(TensorRTUnavailable) as e:
        build_engines(tmp_path, precision="fp32", max_batch=2, max_prompt_tokens=8, max_context=16)
    msg = str(e.value)
    assert 'pip install "dscompile[tensorrt]"' in msg and "NVIDIA" in msg and "CUDA GPU" in msg
    assert "\n" not in msg
    assert not list(tmp_path.glob("*.engine")) and not list(tmp_path.glob(".*tmp*"))


@no_trt
def test_require_tensorrt_raises_unavailable():
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        require_tensorrt()


# -- the runtime side without TensorRT ------------------------------------------------------------


@no_trt
def test_trt_engine_load_without_tensorrt(tmp_path):
    with pytest.raises(TensorRTUnavailable, match=r'pip install "dscompile\[tensorrt\]"'):
        TrtEngine.load(tmp_path)


def test_choose_graph():
    assert choose_graph(1, 5) == "decode"
    assert choose_graph(1, 0) == "prefill"  # a one-token prompt: nothing cached yet
    assert choose_graph(7, 5) == "prefill"  # chunked prefill against a cache


def _section(tmp_path):
    _write_out(tmp_path)
    io = read_graph_io(tmp_path / "decode.onnx", "decode")
    profiles = compute_profiles(io, max_batch=2, max_prompt_tokens=8, max_context=16, step_tokens=8)
    return trt_section(tensorrt_version="10.15.1", precision="fp32", strongly_typed=True, max_batch=2,
                       max_prompt_tokens=8, max_context=16, workspace_gb=1, timing_cache_path=None,
                       onnx_file="decode.onnx", profiles=profiles, step_tokens=8)


def test_manifest_section_written_by_the_builder_is_read_by_the_runtime(tmp_path):
    section = _section(tmp_path)
    assert read_trt_section(json.loads(json.dumps({"tensorrt": section})), tmp_path) == section
    assert section["engine"] == "model.engine" and section["onnx"] == "decode.onnx" and section["step_tokens"] == 8
    assert {n: p["index"] for n, p in section["profiles"].items()} == {"prefill": 0, "decode": 1}
    assert section["tf32"] is False  # IEEE float32 unless the build opted in (compare reads it)
    broken = json.loads(json.dumps(section))
    del broken["profiles"]["decode"]["shapes"]
    with pytest.raises(EngineError, match=r"manifest\.json: tensorrt\.profiles\.decode\.shapes is missing"):
        read_trt_section({"tensorrt": broken}, tmp_path)
    swapped = json.loads(json.dumps(section))
    swapped["profiles"]["prefill"]["index"] = 1
    with pytest.raises(EngineError, match=r"tensorrt\.profiles\.prefill\.index is 1, expected 0"):
        read_trt_section({"tensorrt": swapped}, tmp_path)
    with pytest.raises(EngineError, match=r"tensorrt\.step_tokens must be a positive integer, got 0"):
        read_trt_section({"tensorrt": dict(section, step_tokens=0)}, tmp_path)
    with pytest.raises(EngineError, match="no 'tensorrt' section"):
        read_trt_section({}, tmp_path)


def test_the_engine_per_graph_format_is_refused_with_what_to_do(tmp_path):
    old = {"format": 2, "precision": "fp16", "max_batch": 1, "max_prompt_tokens": 8, "max_context": 16,
           "graphs": {g: {"onnx": f"{g}.onnx", "engine": f"{g}.engine", "profile": {}} for g in ("prefill", "decode")}}
    with pytest.raises(EngineError) as e:
        read_trt_section({"tensorrt": old}, tmp_path)
    msg = str(e.value)
    assert "tensorrt.format 2" in msg and "rebuild the engine" in msg and "--target tensorrt" in msg and "\n" not in msg
    with pytest.raises(EngineError, match="tensorrt.format is 7, this dscompile reads 3"):
        read_trt_section({"tensorrt": dict(old, format=7)}, tmp_path)


def test_profile_check_names_tensor_and_range(tmp_path):
    profile = _section(tmp_path)["profiles"]["prefill"]["shapes"]
    check_profile("prefill", {"input_ids": (2, 8), "past.0.kv_latent": (2, 0, C)}, profile)
    with pytest.raises(EngineError, match=r"prefill profile: input_ids dim 1 is 9, the engine was built for 1\.\.8"):
        check_profile("prefill", {"input_ids": (1, 9)}, profile)
    with pytest.raises(EngineError, match=r"past\.0\.kv_latent dim 0 is 3, the engine was built for 1\.\.2"):
        check_profile("prefill", {"past.0.kv_latent": (3, 4, C)}, profile)
    decode = _section(tmp_path)["profiles"]["decode"]["shapes"]
    with pytest.raises(EngineError, match=r"decode profile: past\.0\.kv_latent dim 1 is 0, the engine was built for 1"):
        check_profile("decode", {"past.0.kv_latent": (1, 0, C)}, decode)


def test_step_plan_picks_the_profile_and_cuts_chunks():
    assert step_plan(1, 5, 8) == [("decode", 0, 1)]
    assert step_plan(1, 0, 8) == [("prefill", 0, 1)]  # a one-token prompt: nothing cached yet
    assert step_plan(8, 0, 8) == [("prefill", 0, 8)]
    assert step_plan(7, 3, 3) == [("prefill", 0, 3), ("prefill", 3, 6), ("decode", 6, 7)]  # a last lone token decodes
    assert step_plan(7, 0, 3) == [("prefill", 0, 3), ("prefill", 3, 6), ("decode", 6, 7)]
    assert step_plan(4, 0, 1) == [("prefill", 0, 1), ("decode", 1, 2), ("decode", 2, 3), ("decode", 3, 4)]
    for S, P, n in ((13, 0, 4), (5, 2, 5), (1, 9, 2), (9, 1, 2)):
        plan = step_plan(S, P, n)
        assert [a for _, a, _ in plan] == list(range(0, S, n)) and plan[-1][2] == S  # consecutive, all covered
        assert all(0 < b - a <= n for _, a, b in plan)
    with pytest.raises(EngineError, match="a step needs new tokens"):
        step_plan(0, 3, 4)


def test_engine_info_from_engine_io():
    io = {
        "input_ids": ((-1, -1), torch.int64),
        "past.0.kv_latent": ((-1, -1, C), torch.float16),
        "past.0.k_rope": ((-1, -1, R), torch.float16),
        "past.1.kv_latent": ((-1, -1, C), torch.float16),
        "past.1.k_rope": ((-1, -1, R), torch.float16),
        "logits": ((-1, -1, V), torch.float32),
    }
    assert engine_info_from_io(io, 4096) == EngineInfo(2, C, R, V, 4096, torch.float16)
    del io["past.0.k_rope"], io["past.0.kv_latent"]
    with pytest.raises(EngineError, match="numbered 0..L-1"):
        engine_info_from_io(io, 4096)


def test_torch_dtype_names():
    assert torch_dtype("HALF") is torch.float16 and torch_dtype("BF16") is torch.bfloat16
    assert torch_dtype("FLOAT") is torch.float32 and torch_dtype("INT64") is torch.int64
    with pytest.raises(EngineError, match="no torch equivalent"):
        torch_dtype("FP4")


# -- real TensorRT ---------------------------------------------------------------------------------


@pytest.mark.tensorrt
@needs_trt
@pytest.mark.parametrize("precision", ["fp32"])
def test_build_and_run_matches_onnxruntime(tmp_path, precision):
    import onnxruntime as ort

    _write_out(tmp_path)
    section = build_engines(tmp_path, precision=precision, max_batch=2, max_prompt_tokens=8, max_context=16,
                            timing_cache_path=tmp_path / "timing.cache")
    assert (tmp_path / "model.engine").stat().st_size > 0 and not list(tmp_path.glob("[pd]*.engine"))
    assert (tmp_path / "timing.cache").is_file()
    (tmp_path / "manifest.json").write_text(json.dumps({"graphs": {"prefill": {"file": "prefill.onnx"}},
                                                        "tensorrt": section}))
    engine = TrtEngine.load(tmp_path)
    assert engine.info == EngineInfo(LAYERS, C, R, V, 16, torch.float32)

    ids = torch.tensor([[3, 5, 7], [1, 2, 9]])
    pos = torch.arange(3).expand(2, 3)
    mask = torch.ones(2, 3, dtype=torch.int64)
    logits, cache = engine.step(ids, pos, mask, None)
    sess = ort.InferenceSession(str(tmp_path / "prefill.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "position_ids": pos.numpy(), "attention_mask": mask.numpy()}
    for i in range(LAYERS):
        feeds[f"past.{i}.kv_latent"] = np.zeros((2, 0, C), np.float32)
        feeds[f"past.{i}.k_rope"] = np.zeros((2, 0, R), np.float32)
    ref = sess.run(["logits"], feeds)[0]
    err = (logits.cpu() - torch.from_numpy(ref)).abs()
    assert err.max() <= 1e-4 * max(1.0, float(np.abs(ref).max())), f"max {err.max():.3e} mean {err.mean():.3e}"
    assert cache.length == 3 and cache.layers[0][0].is_cuda

    # one decode step runs the decode engine, grows the cache by one and gives ONNX Runtime's logits
    logits2, cache2 = engine.step(ids[:, -1:], pos[:, -1:] + 1, torch.ones(2, 4, dtype=torch.int64), cache)
    assert logits2.shape == (2, 1, V) and cache2.length == 4
    past = [f"past.{i}.{kind}" for i in range(LAYERS) for kind in ("kv_latent", "k_rope")]
    decode = ort.InferenceSession(str(tmp_path / "decode.onnx"), providers=["CPUExecutionProvider"])
    ref2 = decode.run(["logits"], {"input_ids": ids[:, -1:].numpy(), "position_ids": (pos[:, -1:] + 1).numpy(),
                                   "attention_mask": np.ones((2, 4), np.int64),
                                   **dict(zip(past, sess.run(None, feeds)[1:]))})[0]
    err = (logits2.cpu() - torch.from_numpy(ref2)).abs()
    assert err.max() <= 1e-4 * max(1.0, float(np.abs(ref2).max())), f"max {err.max():.3e} mean {err.mean():.3e}"

    def greedy(prompt: list[int], n: int) -> list[int]:
        """ONNX Runtime's greedy tokens: the toy graph's logits at a position depend on its token alone."""
        tokens = [prompt[-1]]
        for _ in range(n):
            one = {"input_ids": np.array([tokens[-1:]]), "position_ids": np.zeros((1, 1), np.int64),
                   "attention_mask": np.ones((1, 1), np.int64),
                   **{name: np.zeros((1, 0, C if "kv_latent" in name else R), np.float32) for name in past}}
            tokens.append(int(sess.run(["logits"], one)[0][0, -1].argmax()))
        return tokens[1:]

    assert engine.generate([[3, 5], [6]], 4) == [greedy([3, 5], 4), greedy([6], 4)]  # two different continuations

    # a step longer than the prefill profile's S max (step_tokens = max_prompt_tokens = 8) runs as 8 + 3
    long_ids = torch.randint(0, V, (1, 11), generator=torch.Generator().manual_seed(1))
    one = {"input_ids": long_ids.numpy(), "position_ids": np.arange(11)[None],
           "attention_mask": np.ones((1, 11), np.int64),
           **{name: np.zeros((1, 0, C if "kv_latent" in name else R), np.float32) for name in past}}
    logits3, cache3 = engine.step(long_ids, torch.arange(11)[None], torch.ones(1, 11, dtype=torch.int64), None)
    ref3 = sess.run(["logits"], one)[0]
    assert cache3.length == 11 and logits3.shape == (1, 11, V)
    err = (logits3.cpu() - torch.from_numpy(ref3)).abs()
    assert err.max() <= 1e-4 * max(1.0, float(np.abs(ref3).max())), f"max {err.max():.3e} mean {err.mean():.3e}"
