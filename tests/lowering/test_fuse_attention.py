"""lowering/fuse_attention.py: lowering/ops.py's attention composite over the latent cache as one
LatentAttention that computes what the composite computed; a composite it cannot prove is left."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from dscompile.lowering import fuse_attention
from dscompile.runtime import native

WHY = native.unavailable()
B, H, S, C, R, T = 2, 4, 3, 64, 16, 40


def _composite(scale_rope: float = 0.125) -> onnx.ModelProto:
    """latent_attention as lowering/ops.py writes it for a static number of heads (the rope part scaled by
    `scale_rope`: the composite's own when 0.125)."""
    nodes = [h.make_node("Reshape", ["q", "rows_c"], ["q4"]), h.make_node("Mul", ["q4", "scale"], ["qs"]),
             h.make_node("Reshape", ["qr", "rows_r"], ["qr4"]), h.make_node("Mul", ["qr4", "scale_rope"], ["qrs"]),
             h.make_node("Unsqueeze", ["kv", "axis1"], ["kv4"]), h.make_node("Unsqueeze", ["kr", "axis1"], ["kr4"]),
             h.make_node("Transpose", ["kv4"], ["kvt"], perm=[0, 1, 3, 2]),
             h.make_node("Transpose", ["kr4"], ["krt"], perm=[0, 1, 3, 2]),
             h.make_node("MatMul", ["qs", "kvt"], ["s1"]), h.make_node("MatMul", ["qrs", "krt"], ["s2"]),
             h.make_node("Add", ["s1", "s2"], ["s"]), h.make_node("Reshape", ["s", "heads"], ["s4"]),
             h.make_node("Add", ["s4", "mask"], ["sm"]), h.make_node("Softmax", ["sm"], ["p"], axis=-1),
             h.make_node("Reshape", ["p", "rows"], ["p1"]), h.make_node("MatMul", ["p1", "kv4"], ["o"]),
             h.make_node("Reshape", ["o", "heads"], ["y"])]
    consts = {"rows_c": [0, 1, -1, C], "rows_r": [0, 1, -1, R], "heads": [0, H, -1, 0], "rows": [0, 1, -1, 0],
              "axis1": [1]}
    inits = [nh.from_array(np.array(v, np.int64), n) for n, v in consts.items()]
    inits += [nh.from_array(np.array(0.125, np.float32), "scale"),
              nh.from_array(np.array(scale_rope, np.float32), "scale_rope")]
    shapes = {"q": [B, H, S, C], "qr": [B, H, S, R], "kv": [B, T, C], "kr": [B, T, R], "mask": [B, 1, S, T]}
    graph = h.make_graph(nodes, "attention", [h.make_tensor_value_info(n, TP.FLOAT, s) for n, s in shapes.items()],
                         [h.make_tensor_value_info("y", TP.FLOAT, [B, H, S, C])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


def _fused(model: onnx.ModelProto) -> tuple[int, onnx.ModelProto]:
    ir_model = ir.serde.deserialize_model(model)
    count = fuse_attention.run(ir_model)
    return count, ir.serde.serialize_model(ir_model)


@pytest.mark.skipif(WHY is not None, reason=f"the native kernel library cannot be built here: {WHY}")
def test_the_composite_becomes_one_latent_attention_that_computes_the_same():
    import onnxruntime as ort

    before = _composite()
    count, after = _fused(before)
    assert count == 1 and [n.op_type for n in after.graph.node] == ["LatentAttention"]
    node = after.graph.node[0]
    assert list(node.input) == ["q", "qr", "kv", "kr", "mask"] and node.domain == native.DOMAIN
    rng = np.random.default_rng(0)
    feed = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in before.graph.input}
    feed["mask"][..., :5] = np.finfo(np.float32).min
    options = ort.SessionOptions()
    native.register(options)
    want, got = (ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                 .run(None, feed)[0] for m in (before, after))
    assert np.abs(want).max() > 0.1 and np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_a_composite_whose_parts_differ_from_the_lowerings_is_left():
    # the rope scores scaled unlike the latent ones: not the op's formula, nothing rewritten
    model = _composite(scale_rope=0.5)
    count, after = _fused(model)
    assert count == 0 and [n.op_type for n in after.graph.node] == [n.op_type for n in model.graph.node]
