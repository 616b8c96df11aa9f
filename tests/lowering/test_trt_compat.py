"""The static TensorRT compatibility check (lowering/tensorrt/compat.py): runs everywhere, no TensorRT."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dscompile.lowering.tensorrt.compat import (
    Finding,
    check_model,
    check_out_dir,
    findings_to_dict,
    format_findings,
    load_table,
)
from dscompile.errors import EngineError

F32 = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=(), functions=(), opset=23, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = 10
    return model


def _vi(name, shape, dtype=F32):
    return helper.make_tensor_value_info(name, dtype, shape)


def _errors(findings):
    return [f for f in findings if f.severity == "error"]


def _attention_like():
    """scores = softmax(q @ kᵀ * scale + mask) @ v, plus a residual Add: all TensorRT-native."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kT"),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
        helper.make_node("Mul", ["s", "scale"], ["s2"], name="scale"),
        helper.make_node("Add", ["s2", "mask"], ["s3"], name="mask_add"),
        helper.make_node("Softmax", ["s3"], ["p"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["p", "v"], ["o"], name="pv"),
        helper.make_node("Add", ["o", "q"], ["y"], name="residual"),
        helper.make_node("ReduceSum", ["y", "axes"], ["r"], keepdims=1, name="reduce"),
    ]
    init = [
        numpy_helper.from_array(np.array(0.125, np.float32), "scale"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
    ]
    inputs = [_vi("q", ["B", "S", 8]), _vi("k", ["B", "T", 8]), _vi("v", ["B", "T", 8]), _vi("mask", ["B", "S", "T"])]
    return _model(nodes, inputs, [_vi("y", ["B", "S", 8]), _vi("r", ["B", "S", 1])], init)


def test_table_names_source_version_and_covers_common_ops():
    table = load_table()
    assert "onnx-tensorrt" in table["source"] and "operators.md" in table["source"]
    assert table["tensorrt_version"].startswith("10.")
    assert table["retrieved"]
    must = ("Add Sub Mul Div Pow Sqrt Reciprocal Exp Log Neg Abs Max Min Mean Sum Erf Sigmoid Tanh MatMul Gemm "
            "Softmax ReduceSum ReduceMean ReduceMax Reshape Transpose Squeeze Unsqueeze Concat Slice Split Gather "
            "Shape Cast Where Equal Less Greater And Or Not Range CumSum TopK Expand ConstantOfShape Constant "
            "Identity Trilu ScatterND ScatterElements GatherElements LayerNormalization RMSNormalization "
            "RotaryEmbedding Attention Einsum NonZero If Loop").split()
    missing = [op for op in must if op not in table["ops"]]
    assert not missing, missing
    assert len(table["ops"]) >= 80
    assert table["ops"]["TopK"]["supported"] and table["ops"]["Unique"]["supported"] is False


def test_supported_graph_has_no_findings():
    findings = check_model(_attention_like())
    assert findings == [], format_findings(findings)
    assert findings_to_dict(findings) == {"compatible": True, "errors": 0, "warnings": 0, "findings": []}


def _topk_model(k_source):
    nodes, init, inputs = [], [], [_vi("x", ["B", 16])]
    if k_source == "input":
        inputs.append(_vi("k", [1], TensorProto.INT64))
    elif k_source == "initializer":
        init.append(numpy_helper.from_array(np.array([4], np.int64), "k"))
    elif k_source == "too_big":
        init.append(numpy_helper.from_array(np.array([5000], np.int64), "k"))
    elif k_source == "constant":
        nodes.append(helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([4], np.int64))))
    nodes.append(helper.make_node("TopK", ["x", "k"], ["vals", "idx"], axis=-1, name="route_topk"))
    outs = [_vi("vals", ["B", None]), _vi("idx", ["B", None], TensorProto.INT64)]
    return _model(nodes, inputs, outs, init)


def test_topk_with_k_from_graph_input_is_an_error():
    findings = check_model(_topk_model("input"))
    assert len(findings) == 1
    f = findings[0]
    assert (f.op_type, f.node, f.severity) == ("TopK", "route_topk", "error")
    assert f.reason == "K (input 1) must be a build-time constant (initializer or Constant); it is the graph input 'k'"


@pytest.mark.parametrize("source", ["initializer", "constant"])
def test_topk_with_constant_k_passes(source):
    assert check_model(_topk_model(source)) == []


def test_topk_k_above_tensorrt_limit():
    (f,) = check_model(_topk_model("too_big"))
    assert (f.op_type, f.severity, f.reason) == ("TopK", "error", "K must be less than 3840 (got 5000)")


def test_com_microsoft_op_names_the_domain():
    node = helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma"], ["y"], domain="com.microsoft", name="sln")
    model = _model([node], [_vi("x", [1, 4, 8]), _vi("skip", [1, 4, 8]), _vi("gamma", [8])], [_vi("y", [1, 4, 8])],
                   extra_opsets=[("com.microsoft", 1)])
    (f,) = check_model(model)
    assert (f.node, f.op_type, f.domain, f.severity) == ("sln", "SkipLayerNormalization", "com.microsoft", "error")
    assert f.reason.startswith("domain 'com.microsoft' is not supported by TensorRT: ONNX Runtime contrib ops")


def test_unknown_and_unsupported_ops_are_errors():
    nodes = [
        helper.make_node("FancyOp", ["x"], ["a"], name="fancy"),
        helper.make_node("Unique", ["a"], ["b"], name="uniq"),
    ]
    findings = check_model(_model(nodes, [_vi("x", [4])], [_vi("b", [None])]))
    assert [(f.node, f.op_type, f.severity) for f in findings] == [("fancy", "FancyOp", "error"), ("uniq", "Unique", "error")]
    assert findings[0].reason.startswith("FancyOp is not a TensorRT 10.")
    assert findings[1].reason == f"Unique is not supported by TensorRT {load_table()['tensorrt_version']}"


def test_unsupported_op_inside_a_local_function_is_reported_once_per_body_node():
    body = [
        helper.make_node("Relu", ["fx"], ["fr"], name="body_relu"),
        helper.make_node("Unique", ["fr"], ["fy"], name="body_unique"),
    ]
    fn = helper.make_function("custom.fn", "Block", ["fx"], ["fy"], body, [helper.make_opsetid("", 23)])
    calls = [
        helper.make_node("Block", ["x"], ["h"], domain="custom.fn", name="layer0"),
        helper.make_node("Block", ["h"], ["y"], domain="custom.fn", name="layer1"),
    ]
    model = _model(calls, [_vi("x", [4])], [_vi("y", [None])], functions=[fn], extra_opsets=[("custom.fn", 1)])
    findings = check_model(model)
    assert len(findings) == 1, format_findings(findings)
    f = findings[0]
    assert (f.op_type, f.node, f.severity) == ("Unique", "layer0/body_unique", "error")
    assert f.graph == "g@function custom.fn::Block"


def test_function_formal_input_resolves_to_the_callers_graph_input():
    body = [helper.make_node("TopK", ["fx", "fk"], ["fv", "fi"], name="inner_topk")]
    fn = helper.make_function("custom.fn", "Route", ["fx", "fk"], ["fv", "fi"], body, [helper.make_opsetid("", 23)])
    call = helper.make_node("Route", ["x", "k"], ["v", "i"], domain="custom.fn", name="route")
    model = _model([call], [_vi("x", [2, 8]), _vi("k", [1], TensorProto.INT64)],
                   [_vi("v", [2, None]), _vi("i", [2, None], TensorProto.INT64)],
                   functions=[fn], extra_opsets=[("custom.fn", 1)])
    (f,) = check_model(model)
    assert (f.op_type, f.node) == ("TopK", "route/inner_topk")
    assert f.reason.endswith("it is the graph input 'k'")


def test_subgraph_of_if_is_walked():
    then_g = helper.make_graph([helper.make_node("Unique", ["x"], ["t"], name="then_unique")], "then", [], [_vi("t", [None])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="else_id")], "else", [], [_vi("e", [4])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="branch")
    model = _model([node], [_vi("c", [], TensorProto.BOOL), _vi("x", [4])], [_vi("y", [None])])
    warning, error = check_model(model)
    assert (error.op_type, error.node, error.graph, error.severity) == ("Unique", "then_unique", "g/branch.then_branch", "error")
    # If's own condition (same-rank outputs in both branches) cannot be checked statically: a warning
    assert (warning.op_type, warning.node, warning.severity) == ("If", "branch", "warning")
    assert warning.reason.startswith("If: both branches' outputs must have the same rank")


def test_nonzero_warns_about_data_dependent_shapes():
    node = helper.make_node("NonZero", ["x"], ["idx"], name="nz")
    (f,) = check_model(_model([node], [_vi("x", [4])], [_vi("idx", [1, None], TensorProto.INT64)]))
    assert (f.op_type, f.severity) == ("NonZero", "warning")
    assert f.reason == "NonZero: output shape is data-dependent: everything downstream runs with a run-time shape"


def test_types_from_shape_inference():
    # Cast makes an INT64 tensor; MatMul on INT64 is not a TensorRT MatMul type.
    nodes = [
        helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64, name="to_int"),
        helper.make_node("MatMul", ["xi", "xi"], ["y"], name="int_matmul"),
    ]
    (f,) = check_model(_model(nodes, [_vi("x", [4, 4])], [_vi("y", [4, 4], TensorProto.INT64)]))
    assert (f.node, f.op_type, f.severity) == ("int_matmul", "MatMul", "error")
    assert f.reason == "MatMul does not support INT64 (input 0 'xi'); supported: FP32, FP16, BF16"


def test_opset23_ops_need_recent_tensorrt_and_attention_constraints():
    nodes = [
        helper.make_node("RMSNormalization", ["x", "w"], ["n"], axis=-1, name="norm"),
        helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["o", "presk", "presv"], name="attn"),
    ]
    inputs = [_vi("x", [1, 4, 8]), _vi("w", [8])] + [_vi(n, [1, 2, 4, 8]) for n in ("q", "k", "v", "pk", "pv")]
    outputs = [_vi("n", [1, 4, 8]), _vi("o", [1, 2, 4, 8]), _vi("presk", [1, 2, 8, 8]), _vi("presv", [1, 2, 8, 8])]
    model = _model(nodes, inputs, outputs)
    reasons = {(f.node, f.severity, f.reason) for f in check_model(model)}
    assert ("norm", "warning", "RMSNormalization needs TensorRT >= 10.15 (added to the ONNX parser in 10.15)") in reasons
    assert ("attn", "error", "input 'past_key' is not supported") in reasons
    assert ("attn", "error", "output 'present_value' is not supported") in reasons
    old = {(f.node, f.severity, f.reason) for f in check_model(model, trt_version="10.13")}
    assert ("norm", "error", "RMSNormalization needs TensorRT >= 10.15, target is 10.13") in old


def test_einsum_with_ellipsis_warns():
    node = helper.make_node("Einsum", ["a", "b"], ["c"], equation="...ij,...jk->...ik", name="bmm")
    model = _model([node], [_vi("a", [2, 3, 4]), _vi("b", [2, 4, 5])], [_vi("c", [2, 3, 5])])
    (f,) = check_model(model)
    assert (f.node, f.severity) == ("bmm", "warning")
    assert f.reason.startswith("Einsum '...ij,...jk->...ik' has an ellipsis:")


def test_external_data_model_is_checked_without_reading_weights(tmp_path):
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")
    model = _model([node], [_vi("x", [1, 64])], [_vi("y", [1, 64])], [w])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    # Garbage in place of the weights: reading them would fail, a check that doesn't read them passes.
    (tmp_path / "m.onnx.data").write_bytes(b"not weights")
    assert check_model(path) == []
    (tmp_path / "m.onnx.data").unlink()
    assert check_model(path) == []


def test_check_out_dir_reports_per_file(tmp_path):
    onnx.save(_attention_like(), str(tmp_path / "prefill.onnx"))
    onnx.save(_topk_model("input"), str(tmp_path / "decode.onnx"))
    report = check_out_dir(tmp_path)
    json.dumps(report)  # JSON-able
    assert report["files"]["prefill.onnx"]["errors"] == 0
    assert report["files"]["decode.onnx"]["errors"] == 1
    assert report["files"]["decode.onnx"]["findings"][0]["op_type"] == "TopK"
    assert (report["errors"], report["compatible"]) == (1, False)


def test_check_out_dir_refuses_missing_empty_or_garbled(tmp_path):
    with pytest.raises(EngineError, match="no such engine folder"):
        check_out_dir(tmp_path / "missing")
    with pytest.raises(EngineError, match=r"no \*\.onnx file to check"):
        check_out_dir(tmp_path)
    (tmp_path / "prefill.onnx").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(EngineError, match=r"prefill\.onnx: not a valid ONNX file") as e:
        check_out_dir(tmp_path)
    assert "\n" not in str(e.value)


def test_format_findings_table():
    findings = [
        Finding("g", "n1", "TopK", "ai.onnx", "warning", "w reason"),
        Finding("g", "n2", "SkipLayerNormalization", "com.microsoft", "error", "e reason"),
    ]
    lines = format_findings(findings).splitlines()
    assert lines[0].split() == ["severity", "graph", "node", "op", "reason"]
    assert lines[2].startswith("error") and "com.microsoft::SkipLayerNormalization" in lines[2] and lines[2].endswith("e reason")
    assert lines[3].startswith("warning") and lines[3].endswith("w reason")
    assert format_findings([]) == "no TensorRT compatibility findings"


def test_tensorrt_targeted_export_passes_the_static_check_and_matches_eager(make_ckpt, tmp_path):
    """--target tensorrt lowers MoE with standard ops only: no errors for TensorRT's parser, same numerics."""
    import torch

    from helpers import assert_close
    from dscompile.exporter.export import export_checkpoint
    from dscompile.exporter.options import ExportOptions
    from dscompile.model.checkpoint import load_checkpoint
    from dscompile.runtime.ort_engine import OrtEngine

    ckpt = make_ckpt("v3", layers=2, experts=8)
    manifest = export_checkpoint(ckpt, tmp_path / "trt", ExportOptions(target="tensorrt"))
    assert manifest["target"] == "tensorrt" and manifest["runtime"] == "onnxruntime"
    # the in-place decode graph is for ONNX Runtime on CPU; TensorRT builds from the contract graphs
    assert "in_place" not in manifest["graphs"]["decode"] and not (tmp_path / "trt" / "decode_inplace.onnx").exists()
    report = check_out_dir(tmp_path / "trt")
    for name, result in report["files"].items():
        errors = [f for f in result["findings"] if f["severity"] == "error"]
        assert result["compatible"] and not errors, f"{name}: {errors[:3]}"
    engine, model = OrtEngine.load(tmp_path / "trt"), load_checkpoint(ckpt)
    ids = torch.randint(0, model.args.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    logits, cache = engine.step(ids, torch.arange(5).expand(2, 5), torch.ones(2, 5, dtype=torch.int64), None)
    with torch.no_grad():
        ref, _ = model(ids)
    assert_close(logits, ref, what="tensorrt-targeted ONNX in ONNX Runtime")
