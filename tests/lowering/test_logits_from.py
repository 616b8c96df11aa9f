"""lowering/logits.py on small graphs: the optional input, what it matches and what it leaves alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from dscompile.lowering.logits import add_logits_from


def _graph(head: str) -> ir.Model:
    """hidden [B, S, 8] -> RMSNormalization -> `head` (MatMul, or an Add the pass must not take) -> logits."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="hidden", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", "seq", 8]))
    scale = ir.Value(name="norm.weight", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([8]),
                     const_value=ir.tensor(rng.standard_normal(8).astype(np.float32), name="norm.weight"))
    w = ir.Value(name="lm_head", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([8, 8]),
                 const_value=ir.tensor(rng.standard_normal((8, 8)).astype(np.float32), name="lm_head"))
    norm = ir.node("RMSNormalization", [x, scale], attributes={"axis": -1})
    out = ir.node(head, [norm.outputs[0], w if head == "MatMul" else norm.outputs[0]])
    for value, name in ((norm.outputs[0], "normed"), (out.outputs[0], "logits")):
        value.name, value.type, value.shape = name, x.type, ir.Shape(["batch", "seq", 8])
    graph = ir.Graph([x], [out.outputs[0]], nodes=[norm, out], initializers=[scale, w], opset_imports={"": 23},
                     name="g")
    return ir.Model(graph, ir_version=10)


def _session(model: ir.Model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def test_fed_it_computes_the_last_rows_only_and_left_out_every_row():
    model = _graph("MatMul")
    h = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    full = _session(model).run(["logits"], {"hidden": h})[0]
    assert add_logits_from(model)
    session = _session(model)
    assert [i.name for i in session.get_inputs()] == ["hidden"]  # the contract's inputs are unchanged
    assert [i.name for i in session.get_overridable_initializers()] == ["logits_from"]
    np.testing.assert_allclose(session.run(["logits"], {"hidden": h})[0], full, rtol=1e-6, atol=1e-6)
    last = session.run(["logits"], {"hidden": h, "logits_from": np.array([4])})[0]
    assert last.shape == (2, 1, 8)
    np.testing.assert_allclose(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    assert add_logits_from(model) and [v.name for v in model.graph.inputs].count("logits_from") == 1


def test_a_graph_of_another_form_is_left_alone():
    model = _graph("Add")  # logits not from a MatMul/Gemm/MatMulNBits over the final norm
    before = [n.op_type for n in model.graph]
    assert not add_logits_from(model)
    assert [n.op_type for n in model.graph] == before and [v.name for v in model.graph.inputs] == ["hidden"]
