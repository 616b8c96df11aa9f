"""lowering/fuse_experts.py: a MoE layer's native experts (MoEQ4 over QMoE's router input, the shared MLP on
MatMulQ4) as one ExpertsQ4, computing what the nodes it replaces computed; a layer it cannot prove is left."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from dscompile.lowering import fuse_experts
from dscompile.lowering.encodings import panels
from dscompile.lowering.ops import NOT_CHOSEN
from dscompile.model.quant import Scheme, quantize
from dscompile.runtime import native
from dscompile.runtime.native import DOMAIN

WHY = native.unavailable()
E, K, D, I, T = 8, 3, 64, 32, 5


def _layer(shared: bool, shared_bits: int = 4) -> onnx.ModelProto:
    """x [T, D] -> the routed experts as lowering/ops.py and lowering/quantize.py write them (router Gemm, Softmax,
    TopK, the dense router input, MoEQ4 times Σw), plus the shared MLP on MatMulQ{shared_bits} where `shared`."""
    rng = np.random.default_rng(0)

    def stored(shape, bits=4):
        w = torch.from_numpy(rng.standard_normal(shape).astype(np.float32) / 4)
        q, d = quantize(w, Scheme(bits, 32, search=False))
        return [t.numpy() for t in panels(q, d, bits)]

    (fc1, s1), (fc2, s2) = stored((E, 2 * I, D)), stored((E, D, I))
    inits = {"gate_w": rng.standard_normal((E, D)).astype(np.float32), "k": np.array([K], np.int64),
             "fill": np.array([NOT_CHOSEN], np.float32), "e": np.array([E], np.int64), "axes": np.array([-1], np.int64),
             "fc1": fc1, "s1": s1, "fc2": fc2, "s2": s2}
    nodes = [h.make_node("Gemm", ["x", "gate_w"], ["logits"], transB=1), h.make_node("Softmax", ["logits"], ["scores"]),
             h.make_node("TopK", ["scores", "k"], ["top", "idx"]),
             h.make_node("GatherElements", ["scores", "idx"], ["w"], axis=1), h.make_node("Log", ["w"], ["logw"]),
             h.make_node("Shape", ["x"], ["rows"], start=0, end=1),
             h.make_node("Concat", ["rows", "e"], ["shape"], axis=0),
             h.make_node("Expand", ["fill", "shape"], ["filled"]),
             h.make_node("ScatterElements", ["filled", "idx", "logw"], ["router"], axis=1),
             h.make_node("MoEQ4", ["x", "router", "fc1", "s1", "fc2", "s2"], ["y"], domain=DOMAIN, k=K, I=I),
             h.make_node("ReduceSum", ["w", "axes"], ["total"], keepdims=1),
             h.make_node("Mul", ["y", "total"], ["routed"])]
    out = "routed"
    if shared:
        width = 2 * I
        for name, shape in (("g", (width, D)), ("u", (width, D)), ("d", (D, width))):
            inits[f"{name}_w"], inits[f"{name}_s"] = stored(shape, shared_bits)
        op = f"MatMulQ{shared_bits}"
        nodes += [h.make_node(op, ["x", "g_w", "g_s"], ["g"], domain=DOMAIN, K=D, N=width),
                  h.make_node(op, ["x", "u_w", "u_s"], ["u"], domain=DOMAIN, K=D, N=width),
                  h.make_node("Sigmoid", ["g"], ["sg"]), h.make_node("Mul", ["g", "sg"], ["silu"]),
                  h.make_node("Mul", ["silu", "u"], ["a"]),
                  h.make_node(op, ["a", "d_w", "d_s"], ["sh"], domain=DOMAIN, K=width, N=D),
                  h.make_node("Add", ["routed", "sh"], ["out"])]
        out = "out"
    graph = h.make_graph(nodes, "moe", [h.make_tensor_value_info("x", TP.FLOAT, [T, D])],
                         [h.make_tensor_value_info(out, TP.FLOAT, [T, D])],
                         [nh.from_array(v, n) for n, v in inits.items()])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid(DOMAIN, 1)], ir_version=10)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    native.register(options)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.skipif(WHY is not None, reason=f"the native kernel library cannot be built here: {WHY}")
@pytest.mark.parametrize("shared,shared_bits,width", [(True, 4, 2 * I), (False, 4, 0), (True, 8, 0)])
def test_a_moe_layer_becomes_one_experts_node_that_computes_the_same(shared, shared_bits, width):
    # with a shared MLP of the experts' bits: all fifteen nodes in one; without one, or with one of other bits
    # (MatMulQ8 beside MoEQ4), the routing alone (shared_I 0) and the shared MLP left as it was
    before = _layer(shared, shared_bits)
    model = ir.serde.deserialize_model(before)
    counts = fuse_experts.run(model)
    after = ir.serde.serialize_model(model)
    ops = [n.op_type for n in after.graph.node]
    assert counts["ExpertsQ4"] == 1 and counts[fuse_experts.SHARED_MLPS] == (width > 0)
    assert not {"MoEQ4", "Log", "ScatterElements", "ReduceSum", "Expand"} & set(ops)
    node = next(n for n in after.graph.node if n.op_type == "ExpertsQ4")
    assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "shared_I")) == width
    assert ops.count(f"MatMulQ{shared_bits}") == (0 if width or not shared else 3)
    x = np.random.default_rng(1).standard_normal((T, D)).astype(np.float32)
    want, got = _run(before, x), _run(after, x)
    assert np.abs(want).max() > 0.1
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5  # the same integers; only the sums' order differs


def test_a_router_input_that_is_not_the_lowerings_is_left():
    # the dense router input built another way (no Log of the weights): nothing is rewritten
    model = _layer(False)
    for n in model.graph.node:
        if n.op_type == "Log":
            n.op_type = "Exp"
    ir_model = ir.serde.deserialize_model(model)
    assert fuse_experts.run(ir_model)["ExpertsQ4"] == 0
    assert [n.op_type for n in ir.serde.serialize_model(ir_model).graph.node] == [n.op_type for n in model.graph.node]
