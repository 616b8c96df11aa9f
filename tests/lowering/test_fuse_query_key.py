"""lowering/fuse_query_key.py: a layer's query and key preparation (split, de-interleave, rotate, normalize,
transpose) as one QueryRope and one LatentKey that compute what the nodes did, and the nodes it cannot prove
left as they are."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from dscompile.lowering import fuse_query_key
from dscompile.runtime import native

WHY = native.unavailable()
B, S, H, N, R, C = 2, 3, 4, 16, 8, 32
EPS = 1e-6


def _layer(interleaved: bool = True, perm: list[int] | None = None, nope_perm: list[int] | None = None,
           extra_use: bool = False) -> onnx.ModelProto:
    """The nodes between a layer's projections (q [B, S, H*(N+R)], kv [B, S, C+R]) and its attention, as the
    lowering writes them. `perm`: the Gather's permutation (the de-interleaving one by default); `nope_perm`:
    the unrotated query's Transpose; `extra_use`: the query's rotary part also a graph output."""
    deinterleave = perm or list(range(0, R, 2)) + list(range(1, R, 2))
    q_rope, k_rope = ("qg", "kg") if interleaved else ("qr", "kr")
    nodes = [h.make_node("Reshape", ["q", "heads_view"], ["view"]),
             h.make_node("Split", ["view", "q_sizes"], ["nope", "qr"], axis=3),
             h.make_node("Reshape", [q_rope, "flat"], ["qf"]),
             h.make_node("RotaryEmbedding", ["qf", "cos", "sin"], ["qrot"], num_heads=H, interleaved=0),
             h.make_node("Reshape", ["qrot", "heads_rope"], ["qback"]),
             h.make_node("Transpose", ["qback"], ["q_rope"], perm=[0, 2, 1, 3]),
             h.make_node("Transpose", ["nope"], ["q_nope"], perm=nope_perm or [0, 2, 1, 3]),
             h.make_node("Split", ["kv", "kv_sizes"], ["latent", "kr"], axis=2),
             h.make_node("RMSNormalization", ["latent", "norm"], ["kv_latent"], axis=-1, epsilon=EPS, stash_type=1),
             h.make_node("RotaryEmbedding", [k_rope, "cos", "sin"], ["k_rope"], num_heads=1, interleaved=0)]
    if interleaved:
        nodes[2:2] = [h.make_node("Gather", ["qr", "deinterleave"], ["qg"], axis=3)]
        nodes.append(h.make_node("Gather", ["kr", "deinterleave"], ["kg"], axis=2))
        nodes = nodes[:-2] + [nodes[-1], nodes[-2]]  # the key's Gather before its rotation
    consts = {"heads_view": [0, 0, H, N + R], "q_sizes": [N, R], "flat": [0, 0, H * R], "heads_rope": [0, 0, H, R],
              "kv_sizes": [C, R], "deinterleave": deinterleave}
    inits = [nh.from_array(np.array(v, np.int64), n) for n, v in consts.items()]
    rng = np.random.default_rng(1)
    inits.append(nh.from_array((1 + 0.5 * rng.standard_normal(C)).astype(np.float32), "norm"))
    shapes = {"q": [B, S, H * (N + R)], "kv": [B, S, C + R], "cos": [B, S, R // 2], "sin": [B, S, R // 2]}
    outputs = {"q_nope": [B, H, S, N], "q_rope": [B, H, S, R], "kv_latent": [B, S, C], "k_rope": [B, S, R]}
    if nope_perm is not None:
        outputs["q_nope"] = [outputs["q_nope"][i] for i in (0, 1, 3, 2)]
    if extra_use:
        outputs["qr"] = [B, S, H, R]
    graph = h.make_graph(nodes, "layer", [h.make_tensor_value_info(n, TP.FLOAT, s) for n, s in shapes.items()],
                         [h.make_tensor_value_info(n, TP.FLOAT, s) for n, s in outputs.items()], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 23)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


def _fused(model: onnx.ModelProto) -> tuple[dict[str, int], onnx.ModelProto]:
    ir_model = ir.serde.deserialize_model(model)
    counts = fuse_query_key.run(ir_model)
    return counts, ir.serde.serialize_model(ir_model)


def _feed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    angle = rng.uniform(0, 6.3, (B, S, R // 2))
    return {"q": rng.standard_normal((B, S, H * (N + R))).astype(np.float32),
            "kv": (3 * rng.standard_normal((B, S, C + R))).astype(np.float32),
            "cos": np.cos(angle).astype(np.float32), "sin": np.sin(angle).astype(np.float32)}


def _reference(feed: dict[str, np.ndarray], norm: np.ndarray, interleaved: bool) -> list[np.ndarray]:
    """The four outputs in float64 numpy, from the model's own formulas."""
    d = np.float64
    cos, sin = feed["cos"].astype(d), feed["sin"].astype(d)

    def rotate(x, c, s):  # x [..., R]: its pairs (interleaved or halves) rotated, [firsts, seconds] out
        a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., : R // 2], x[..., R // 2:])
        return np.concatenate([a * c - b * s, b * c + a * s], -1)

    q = feed["q"].astype(d).reshape(B, S, H, N + R)
    q_rope = rotate(q[..., N:], cos[:, :, None], sin[:, :, None])
    kv = feed["kv"].astype(d)
    latent = kv[..., :C] / np.sqrt((kv[..., :C] ** 2).mean(-1, keepdims=True) + EPS) * norm.astype(d)
    return [q[..., :N].transpose(0, 2, 1, 3), q_rope.transpose(0, 2, 1, 3), latent, rotate(kv[..., C:], cos, sin)]


@pytest.mark.skipif(WHY is not None, reason=f"the native kernel library cannot be built here: {WHY}")
@pytest.mark.parametrize("interleaved", [True, False])
def test_a_layers_query_and_key_become_two_native_nodes_that_compute_the_same(interleaved):
    import onnxruntime as ort

    before = _layer(interleaved)
    counts, after = _fused(before)
    assert counts == {"QueryRope": 1, "LatentKey": 1}
    assert sorted(n.op_type for n in after.graph.node) == ["LatentKey", "QueryRope"]
    attrs = {n.op_type: {a.name: h.get_attribute_value(a) for a in n.attribute} for n in after.graph.node}
    assert attrs["QueryRope"] == {"heads": H, "nope": N, "interleaved": int(interleaved)}
    assert attrs["LatentKey"]["interleaved"] == int(interleaved) and attrs["LatentKey"]["epsilon"] == pytest.approx(EPS)
    feed = _feed()
    options = ort.SessionOptions()
    native.register(options)
    want, got = (ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                 .run(None, feed) for m in (before, after))
    norm = nh.to_array(next(t for t in before.graph.initializer if t.name == "norm"))
    for w, g, ref in zip(want, got, _reference(feed, norm, interleaved)):
        assert g.shape == w.shape == ref.shape and np.abs(ref).max() > 0.5
        assert np.abs(g - ref).max() / np.abs(ref).max() < 1e-6  # the kernels against float64
        assert np.abs(w - ref).max() / np.abs(ref).max() < 1e-6  # (and the nodes they replace)


@pytest.mark.parametrize("variant", [dict(perm=[1, 0, 3, 2, 5, 4, 7, 6]), dict(nope_perm=[0, 2, 3, 1]),
                                     dict(extra_use=True)], ids=["another_gather", "another_transpose", "rope_used"])
def test_what_the_ops_do_not_compute_is_left(variant):
    # a Gather that is not the de-interleaving: the key and the query both stay; a query transposed otherwise,
    # or whose rotary part is read elsewhere: the query stays, the key is still fused
    model = _layer(**variant)
    counts, after = _fused(model)
    assert counts["QueryRope"] == 0
    assert counts["LatentKey"] == (0 if "perm" in variant else 1)
    ops = [n.op_type for n in after.graph.node]
    assert ops.count("RotaryEmbedding") == (2 if "perm" in variant else 1) and "QueryRope" not in ops


@pytest.mark.skipif(WHY is not None, reason=f"the native kernel library cannot be built here: {WHY}")
def test_the_ops_refuse_inputs_of_other_shapes():
    import onnxruntime as ort

    _, after = _fused(_layer())
    for value in list(after.graph.input) + list(after.graph.output) + list(after.graph.value_info):
        value.type.tensor_type.ClearField("shape")  # any shapes reach the kernels
    options = ort.SessionOptions()
    native.register(options)
    session = ort.InferenceSession(after.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for name, width, message in (("q", H * (N + R) - 1, "QueryRope: expected q"),
                                 ("kv", C + R + 2, "LatentKey: expected kv")):
        feed = _feed()
        feed[name] = np.ones((B, S, width), np.float32)
        with pytest.raises(Exception, match=message):
            session.run(None, feed)
